//! Self-service: the caller's profile (GetMe, UpdateMe), preferences and
//! deleting their own account.

use chrono::Utc;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use tonic::{Request, Response, Status};
use trellis_auth::audit::{Origin, record};
use trellis_core::error::FieldViolations;
use trellis_mesh::authenticated;
use trellis_proto::user::v1 as pb;
use trellis_store::audit::AuditEvent;
use trellis_store::schema::{user_preferences, users};

use crate::convert::{json_to_struct, struct_to_json, ts};
use crate::error::UserError;
use crate::service::UserSvc;
use crate::validate::{SELF_FIELDS, patch};

const PREF_FIELDS: &[&str] = &[
    "communication_style",
    "industry_focus",
    "experience_levels",
    "default_search_filters",
    "custom",
];
const MAX_STRUCT_BYTES: usize = 16 * 1024;

type PrefRow = (
    String,
    Vec<String>,
    Vec<String>,
    serde_json::Value,
    serde_json::Value,
    chrono::DateTime<Utc>,
);

fn style_db(s: pb::CommunicationStyle) -> &'static str {
    match s {
        pb::CommunicationStyle::Formal => "formal",
        pb::CommunicationStyle::Casual => "casual",
        pb::CommunicationStyle::Technical => "technical",
        pb::CommunicationStyle::Unspecified => "",
    }
}

fn style_pb(s: &str) -> pb::CommunicationStyle {
    match s {
        "formal" => pb::CommunicationStyle::Formal,
        "casual" => pb::CommunicationStyle::Casual,
        "technical" => pb::CommunicationStyle::Technical,
        _ => pb::CommunicationStyle::Unspecified,
    }
}

#[derive(Debug, Default, AsChangeset)]
#[diesel(table_name = user_preferences)]
struct PrefsPatch {
    communication_style: Option<String>,
    industry_focus: Option<Vec<String>>,
    experience_levels: Option<Vec<String>>,
    default_search_filters: Option<serde_json::Value>,
    custom: Option<serde_json::Value>,
}

fn list(v: &mut FieldViolations, field: &str, items: &[String], max: usize) -> Vec<String> {
    if items.len() > max {
        v.add(field, format!("at most {max} entries"));
    }
    for (i, item) in items.iter().enumerate() {
        if item.trim().is_empty() || item.chars().count() > 50 || item.chars().any(char::is_control)
        {
            v.add(format!("{field}[{i}]"), "must be 1 to 50 characters");
        }
    }
    items.iter().map(|s| s.trim().to_string()).collect()
}

impl UserSvc {
    pub(crate) async fn rpc_get_me(
        &self,
        req: Request<pb::GetMeRequest>,
    ) -> Result<Response<pb::GetMeResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:self:read")?;
        let user = self.look_up(p.user_id, false).await?;
        Ok(Response::new(pb::GetMeResponse { user: Some(user) }))
    }

    pub(crate) async fn rpc_update_me(
        &self,
        req: Request<pb::UpdateMeRequest>,
    ) -> Result<Response<pb::UpdateMeResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:self:write")?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let user = r.user.unwrap_or_default();
        let (changes, changed) =
            patch(&user, r.update_mask.as_ref(), SELF_FIELDS).map_err(UserError::from)?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let n = diesel::update(
            users::table
                .filter(users::id.eq(p.user_id))
                .filter(users::deleted_at.is_null()),
        )
        .set((&changes, users::updated_at.eq(Utc::now())))
        .execute(&mut conn)
        .await
        .map_err(UserError::from)?;
        if n == 0 {
            return Err(UserError::NotFound.into());
        }
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(p.user_id),
                action: "user.profile.updated",
                target_type: "user",
                target_id: p.user_id.to_string(),
                changed_fields: changed,
                ..Default::default()
            },
        )
        .await;
        let user = Self::user(&mut conn, p.user_id, false).await?;
        Ok(Response::new(pb::UpdateMeResponse { user: Some(user) }))
    }

    pub(crate) async fn rpc_get_preferences(
        &self,
        req: Request<pb::GetPreferencesRequest>,
    ) -> Result<Response<pb::GetPreferencesResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:self:read")?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let prefs = self.load_preferences(&mut conn, p.user_id).await?;
        Ok(Response::new(pb::GetPreferencesResponse {
            preferences: Some(prefs),
        }))
    }

    async fn load_preferences(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        user: uuid::Uuid,
    ) -> Result<pb::Preferences, UserError> {
        let row: Option<PrefRow> = user_preferences::table
            .filter(user_preferences::user_id.eq(user))
            .select((
                user_preferences::communication_style,
                user_preferences::industry_focus,
                user_preferences::experience_levels,
                user_preferences::default_search_filters,
                user_preferences::custom,
                user_preferences::updated_at,
            ))
            .first(conn)
            .await
            .optional()?;
        Ok(match row {
            Some((style, industry, levels, filters, custom, at)) => pb::Preferences {
                communication_style: style_pb(&style) as i32,
                industry_focus: industry,
                experience_levels: levels,
                default_search_filters: Some(json_to_struct(&filters)),
                custom: Some(json_to_struct(&custom)),
                update_time: Some(ts(at)),
            },
            None => pb::Preferences::default(),
        })
    }

    pub(crate) async fn rpc_update_preferences(
        &self,
        req: Request<pb::UpdatePreferencesRequest>,
    ) -> Result<Response<pb::UpdatePreferencesResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:self:write")?;
        let origin = Origin::of(&req);
        let r = req.into_inner();
        let prefs = r.preferences.unwrap_or_default();
        let paths: Vec<String> = match r.update_mask.filter(|m| !m.paths.is_empty()) {
            Some(m) => m.paths,
            None => PREF_FIELDS.iter().map(|s| s.to_string()).collect(),
        };
        let mut v = FieldViolations::new();
        let mut patch = PrefsPatch::default();
        for path in &paths {
            let field = format!("preferences.{path}");
            match path.as_str() {
                "communication_style" => {
                    match pb::CommunicationStyle::try_from(prefs.communication_style) {
                        Ok(s) => patch.communication_style = Some(style_db(s).to_string()),
                        Err(_) => v.add(field, "is not a known communication style"),
                    }
                }
                "industry_focus" => {
                    patch.industry_focus = Some(list(&mut v, &field, &prefs.industry_focus, 20))
                }
                "experience_levels" => {
                    patch.experience_levels =
                        Some(list(&mut v, &field, &prefs.experience_levels, 10))
                }
                "default_search_filters" | "custom" => {
                    let s = if path == "custom" {
                        &prefs.custom
                    } else {
                        &prefs.default_search_filters
                    };
                    let json = s
                        .as_ref()
                        .map(struct_to_json)
                        .unwrap_or_else(|| serde_json::json!({}));
                    if json.to_string().len() > MAX_STRUCT_BYTES {
                        v.add(
                            field,
                            format!("must encode to at most {MAX_STRUCT_BYTES} bytes"),
                        );
                    }
                    if path == "custom" {
                        patch.custom = Some(json);
                    } else {
                        patch.default_search_filters = Some(json);
                    }
                }
                other => v.add("update_mask", format!("'{other}' is not a preference")),
            }
        }
        v.check()?;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        // Make sure the row exists, then apply only the masked fields.
        diesel::insert_into(user_preferences::table)
            .values(user_preferences::user_id.eq(p.user_id))
            .on_conflict_do_nothing()
            .execute(&mut conn)
            .await
            .map_err(UserError::from)?;
        diesel::update(user_preferences::table.filter(user_preferences::user_id.eq(p.user_id)))
            .set((&patch, user_preferences::updated_at.eq(Utc::now())))
            .execute(&mut conn)
            .await
            .map_err(UserError::from)?;
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(p.user_id),
                action: "user.preferences.updated",
                target_type: "user",
                target_id: p.user_id.to_string(),
                changed_fields: paths,
                ..Default::default()
            },
        )
        .await;
        let prefs = self.load_preferences(&mut conn, p.user_id).await?;
        Ok(Response::new(pb::UpdatePreferencesResponse {
            preferences: Some(prefs),
        }))
    }

    pub(crate) async fn rpc_delete_me(
        &self,
        req: Request<pb::DeleteMeRequest>,
    ) -> Result<Response<pb::DeleteMeResponse>, Status> {
        let p = authenticated(&req)?;
        p.require("user:self:write")?;
        let origin = Origin::of(&req);
        let password = req.into_inner().password;
        let mut conn = self.store.pg().await.map_err(UserError::from)?;
        let hash: Option<String> = users::table
            .filter(users::id.eq(p.user_id))
            .filter(users::deleted_at.is_null())
            .select(users::password_hash)
            .first(&mut conn)
            .await
            .optional()
            .map_err(UserError::from)?;
        let Some(hash) = hash else {
            return Err(UserError::NotFound.into());
        };
        if password.is_empty()
            || !self
                .hasher
                .verify(password, Some(hash))
                .await
                .map_err(UserError::from)?
        {
            let mut v = FieldViolations::new();
            v.add("password", "must be your current password");
            return Err(v.into_status());
        }
        diesel::update(users::table.filter(users::id.eq(p.user_id)))
            .set((
                users::deleted_at.eq(Utc::now()),
                users::updated_at.eq(Utc::now()),
            ))
            .execute(&mut conn)
            .await
            .map_err(UserError::from)?;
        trellis_auth::end_user_access(&mut conn, &self.revocations, p.user_id, "account deleted")
            .await
            .map_err(UserError::from)?;
        record(
            &mut conn,
            &origin,
            AuditEvent {
                actor_id: Some(p.user_id),
                action: "user.deleted",
                target_type: "user",
                target_id: p.user_id.to_string(),
                ..Default::default()
            },
        )
        .await;
        Ok(Response::new(pb::DeleteMeResponse {}))
    }
}
