//! Diesel table definitions, kept by hand in step with `migrations/`.
//! Each service writes only its own tables (docs/architecture.md, data).

diesel::table! {
    use diesel::sql_types::*;

    /// The account core, shared by auth and user through `accounts`.
    users (id) {
        id -> Uuid,
        email -> Citext,
        username -> Citext,
        password_hash -> Text,
        display_name -> Text,
        status -> Text,
        email_verified_at -> Nullable<Timestamptz>,
        token_version -> Int4,
        failed_logins -> Int4,
        first_failed_at -> Nullable<Timestamptz>,
        locked_until -> Nullable<Timestamptz>,
        lockouts -> Int4,
        totp_secret -> Nullable<Text>,
        totp_enabled_at -> Nullable<Timestamptz>,
        totp_pending_secret -> Nullable<Text>,
        totp_last_step -> Nullable<Int8>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        deleted_at -> Nullable<Timestamptz>,
        first_name -> Text,
        last_name -> Text,
        phone -> Text,
        date_of_birth -> Nullable<Date>,
        bio -> Text,
        avatar_url -> Text,
        locale -> Text,
        time_zone -> Text,
        suspend_reason -> Nullable<Text>,
        search_text -> Text,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// User service: one row per account that set preferences.
    user_preferences (user_id) {
        user_id -> Uuid,
        communication_style -> Text,
        industry_focus -> Array<Text>,
        experience_levels -> Array<Text>,
        default_search_filters -> Jsonb,
        custom -> Jsonb,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    roles (name) {
        name -> Text,
        description -> Text,
        permissions -> Array<Text>,
        builtin -> Bool,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    user_roles (user_id, role) {
        user_id -> Uuid,
        role -> Text,
        granted_at -> Timestamptz,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Auth: one row per refresh-token family.
    auth_sessions (id) {
        id -> Uuid,
        user_id -> Uuid,
        created_at -> Timestamptz,
        last_used_at -> Timestamptz,
        expires_at -> Timestamptz,
        user_agent -> Text,
        ip_address -> Text,
        revoked_at -> Nullable<Timestamptz>,
        revoke_reason -> Nullable<Text>,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Auth: SHA-256 of every refresh token issued, used or not.
    refresh_tokens (token_hash) {
        token_hash -> Bytea,
        session_id -> Uuid,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        used_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Auth: Ed25519 signing keys.
    signing_keys (kid) {
        kid -> Text,
        private_key -> Bytea,
        public_key -> Bytea,
        created_at -> Timestamptz,
        retired_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Auth: hashed single-use tokens for password reset and e-mail verification.
    auth_one_time_tokens (token_hash) {
        token_hash -> Bytea,
        user_id -> Uuid,
        purpose -> Text,
        email -> Citext,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
        used_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Mail waiting for (or kept after) delivery.
    mail_outbox (id) {
        id -> Uuid,
        to_address -> Text,
        subject -> Text,
        body -> Text,
        purpose -> Text,
        created_at -> Timestamptz,
        sent_at -> Nullable<Timestamptz>,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        last_error -> Nullable<Text>,
        user_id -> Nullable<Uuid>,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// The audit trail, written by every service.
    audit_events (id) {
        id -> Uuid,
        occurred_at -> Timestamptz,
        actor_id -> Nullable<Uuid>,
        action -> Text,
        target_type -> Text,
        target_id -> Text,
        changed_fields -> Array<Text>,
        details -> Jsonb,
        request_id -> Text,
        ip_address -> Text,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Auth: SHA-256 of each TOTP recovery code; a used code keeps its row.
    totp_recovery_codes (user_id, code_hash) {
        user_id -> Uuid,
        code_hash -> Bytea,
        used_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Auth: API keys, the secret stored only as a SHA-256 hash.
    api_keys (id) {
        id -> Uuid,
        user_id -> Uuid,
        name -> Text,
        scopes -> Array<Text>,
        prefix -> Text,
        secret_hash -> Bytea,
        created_at -> Timestamptz,
        expires_at -> Nullable<Timestamptz>,
        last_used_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// LLM gateway: one accounting row per call.
    llm_usage (id) {
        id -> Uuid,
        user_id -> Uuid,
        model -> Text,
        provider -> Text,
        upstream_model -> Text,
        prompt_tokens -> Int4,
        completion_tokens -> Int4,
        estimated -> Bool,
        cost_micros -> Int8,
        ttft_ms -> Nullable<Int4>,
        duration_ms -> Int4,
        status -> Text,
        cached -> Bool,
        request_id -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Search: indexed documents (the tsvector is written by SQL, not read).
    search_documents (id) {
        id -> Uuid,
        owner_id -> Uuid,
        collection -> Text,
        external_id -> Text,
        title -> Text,
        body -> Text,
        tags -> Array<Text>,
        attributes -> Jsonb,
        shared -> Bool,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Search: one row per search run.
    search_history (id) {
        id -> Uuid,
        user_id -> Uuid,
        query -> Text,
        filters -> Jsonb,
        result_count -> Int8,
        latency_ms -> Int4,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Chat: sessions.
    chat_sessions (id) {
        id -> Uuid,
        user_id -> Uuid,
        title -> Text,
        model -> Text,
        system_prompt -> Text,
        retrieval -> Bool,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        last_activity_at -> Timestamptz,
        deleted_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    use diesel::sql_types::*;

    /// Chat: messages (the generated tsvector is not mapped).
    chat_messages (id) {
        id -> Uuid,
        session_id -> Uuid,
        user_id -> Uuid,
        role -> Text,
        content -> Text,
        status -> Text,
        client_message_id -> Nullable<Text>,
        reply_to -> Nullable<Uuid>,
        model -> Text,
        provider -> Text,
        prompt_tokens -> Int4,
        completion_tokens -> Int4,
        cost_micros -> Int8,
        citations -> Jsonb,
        error -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        heartbeat_at -> Timestamptz,
        finish_reason -> Text,
        error_code -> Int4,
        time_to_first_token_micros -> Nullable<Int8>,
        duration_micros -> Nullable<Int8>,
    }
}

diesel::joinable!(user_roles -> users (user_id));
diesel::joinable!(user_roles -> roles (role));
diesel::joinable!(auth_sessions -> users (user_id));
diesel::joinable!(user_preferences -> users (user_id));
diesel::joinable!(refresh_tokens -> auth_sessions (session_id));
diesel::joinable!(auth_one_time_tokens -> users (user_id));
diesel::joinable!(mail_outbox -> users (user_id));
diesel::joinable!(totp_recovery_codes -> users (user_id));
diesel::joinable!(api_keys -> users (user_id));
diesel::joinable!(llm_usage -> users (user_id));
diesel::joinable!(search_documents -> users (owner_id));
diesel::joinable!(search_history -> users (user_id));
diesel::joinable!(chat_sessions -> users (user_id));
diesel::joinable!(chat_messages -> chat_sessions (session_id));

diesel::allow_tables_to_appear_in_same_query!(
    users,
    roles,
    user_roles,
    auth_sessions,
    refresh_tokens,
    signing_keys,
    auth_one_time_tokens,
    mail_outbox,
    audit_events,
    totp_recovery_codes,
    api_keys,
    user_preferences,
    llm_usage,
    search_documents,
    search_history,
    chat_sessions,
    chat_messages,
);
