//! Profile updates: the field mask decides what changes (AIP-134: no mask
//! means every field the request sets), each named field is validated, and
//! the result is a changeset plus the list of changed fields for the audit.

use chrono::{Datelike, NaiveDate, Utc};
use diesel::AsChangeset;
use trellis_core::error::FieldViolations;
use trellis_proto::user::v1 as pb;
use trellis_store::schema::users;

/// Fields a user may change on themselves.
pub const SELF_FIELDS: &[&str] = &[
    "display_name",
    "first_name",
    "last_name",
    "phone",
    "date_of_birth",
    "bio",
    "avatar_url",
    "locale",
    "time_zone",
];

/// What an update writes; `None` leaves a column alone.
#[derive(Debug, Default, AsChangeset)]
#[diesel(table_name = users)]
pub struct ProfilePatch {
    pub display_name: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub date_of_birth: Option<Option<NaiveDate>>,
    pub bio: Option<String>,
    pub avatar_url: Option<String>,
    pub locale: Option<String>,
    pub time_zone: Option<String>,
    pub email: Option<String>,
    pub username: Option<String>,
}

fn text(v: &mut FieldViolations, field: &str, value: &str, max: usize) {
    if value.chars().count() > max {
        v.add(field, format!("must be at most {max} characters"));
    } else if value.chars().any(char::is_control) {
        v.add(field, "must not contain control characters");
    }
}

fn is_e164(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or("");
    (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

fn is_locale(s: &str) -> bool {
    let mut parts = s.split('-');
    let first = parts.next().unwrap_or("");
    (2..=3).contains(&first.len())
        && first.bytes().all(|b| b.is_ascii_alphabetic())
        && parts.all(|p| (2..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Builds the patch for `user` under `mask`, allowing `allowed` fields.
pub fn patch(
    user: &pb::User,
    mask: Option<&prost_types::FieldMask>,
    allowed: &[&str],
) -> Result<(ProfilePatch, Vec<String>), FieldViolations> {
    let mut v = FieldViolations::new();
    let paths: Vec<String> = match mask.filter(|m| !m.paths.is_empty()) {
        Some(m) => m.paths.clone(),
        None => allowed
            .iter()
            .filter(|f| !field_is_empty(user, f))
            .map(|f| f.to_string())
            .collect(),
    };
    if paths.is_empty() {
        v.add("update_mask", "names no field to change");
        return Err(v);
    }
    let mut p = ProfilePatch::default();
    let mut changed = Vec::new();
    for path in &paths {
        let path = path.trim();
        if !allowed.contains(&path) {
            v.add("update_mask", format!("'{path}' cannot be changed here"));
            continue;
        }
        let field = format!("user.{path}");
        match path {
            "display_name" => {
                text(&mut v, &field, &user.display_name, 100);
                p.display_name = Some(user.display_name.trim().to_string());
            }
            "first_name" => {
                text(&mut v, &field, &user.first_name, 100);
                p.first_name = Some(user.first_name.trim().to_string());
            }
            "last_name" => {
                text(&mut v, &field, &user.last_name, 100);
                p.last_name = Some(user.last_name.trim().to_string());
            }
            "phone" => {
                if !user.phone.is_empty() && !is_e164(&user.phone) {
                    v.add(&field, "must be an E.164 number like +14155550123");
                }
                p.phone = Some(user.phone.clone());
            }
            "date_of_birth" => {
                if user.date_of_birth.is_empty() {
                    p.date_of_birth = Some(None);
                } else {
                    match NaiveDate::parse_from_str(&user.date_of_birth, "%Y-%m-%d") {
                        Ok(d) if d < Utc::now().date_naive() && d.year() > 1900 => {
                            p.date_of_birth = Some(Some(d))
                        }
                        Ok(_) => v.add(&field, "must be in the past (and after 1900)"),
                        Err(_) => v.add(&field, "must be a date like 1990-04-30"),
                    }
                }
            }
            "bio" => {
                if user.bio.chars().count() > 500 {
                    v.add(&field, "must be at most 500 characters");
                } else if !trellis_core::text::is_clean_text(&user.bio) {
                    v.add(
                        &field,
                        "must not contain control characters other than tabs and line breaks",
                    );
                }
                p.bio = Some(user.bio.clone());
            }
            "avatar_url" => {
                let u = &user.avatar_url;
                if !u.is_empty()
                    && (u.len() > 500
                        || !(u.starts_with("https://") || u.starts_with("http://"))
                        || u.chars().any(|c| c.is_whitespace() || c.is_control()))
                {
                    v.add(&field, "must be an http(s) URL of at most 500 characters");
                }
                p.avatar_url = Some(u.clone());
            }
            "locale" => {
                if !user.locale.is_empty() && !is_locale(&user.locale) {
                    v.add(&field, "must be a language tag like en-GB");
                }
                p.locale = Some(user.locale.clone());
            }
            "time_zone" => {
                if !user.time_zone.is_empty() && user.time_zone.parse::<chrono_tz::Tz>().is_err() {
                    v.add(&field, "must be an IANA time zone like Europe/Berlin");
                }
                p.time_zone = Some(user.time_zone.clone());
            }
            "email" => {
                trellis_auth::validate::email(&mut v, &field, user.email.trim());
                p.email = Some(user.email.trim().to_string());
            }
            "username" => {
                trellis_auth::validate::username(&mut v, &field, user.username.trim());
                p.username = Some(user.username.trim().to_string());
            }
            _ => {}
        }
        changed.push(path.to_string());
    }
    if v.is_empty() {
        Ok((p, changed))
    } else {
        Err(v)
    }
}

fn field_is_empty(u: &pb::User, f: &str) -> bool {
    match f {
        "display_name" => u.display_name.is_empty(),
        "first_name" => u.first_name.is_empty(),
        "last_name" => u.last_name.is_empty(),
        "phone" => u.phone.is_empty(),
        "date_of_birth" => u.date_of_birth.is_empty(),
        "bio" => u.bio.is_empty(),
        "avatar_url" => u.avatar_url.is_empty(),
        "locale" => u.locale.is_empty(),
        "time_zone" => u.time_zone.is_empty(),
        "email" => u.email.is_empty(),
        "username" => u.username.is_empty(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert!(is_e164("+14155550123"));
        assert!(!is_e164("14155550123") && !is_e164("+0123") && !is_e164("+1415555012345678"));
        assert!(is_locale("en") && is_locale("en-GB") && is_locale("zh-Hant-TW"));
        assert!(!is_locale("e") && !is_locale("en_GB"));
    }

    #[test]
    fn mask_rules() {
        let u = pb::User {
            display_name: "Ada".into(),
            phone: "nope".into(),
            ..Default::default()
        };
        let mask = prost_types::FieldMask {
            paths: vec!["display_name".into(), "email".into()],
        };
        let err = patch(&u, Some(&mask), SELF_FIELDS).expect_err("email not allowed");
        assert!(err.iter().any(|(f, _)| f == "update_mask"));
        let err = patch(&u, None, SELF_FIELDS).expect_err("implied mask includes the bad phone");
        assert!(err.iter().any(|(f, _)| f == "user.phone"));
        let ok = prost_types::FieldMask {
            paths: vec!["display_name".into(), "bio".into()],
        };
        let (p, changed) = patch(&u, Some(&ok), SELF_FIELDS).expect("valid");
        assert_eq!(p.display_name.as_deref(), Some("Ada"));
        assert_eq!(
            p.bio.as_deref(),
            Some(""),
            "a masked empty field is cleared"
        );
        assert_eq!(changed, vec!["display_name", "bio"]);
    }
}
