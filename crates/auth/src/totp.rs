//! TOTP second factor: enrolment (secret + otpauth URI), confirmation with
//! one-time recovery codes, disabling, and the check Login makes for
//! enrolled accounts.

use diesel_async::AsyncPgConnection;
use tonic::{Request, Response, Status};
use trellis_proto::auth::v1 as pb;
use trellis_store::accounts::Account;

use crate::error::AuthError;
use crate::service::{AuthSvc, not_built};

impl AuthSvc {
    pub(crate) async fn rpc_enroll_totp(
        &self,
        _: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        Err(not_built("EnrollTotp"))
    }

    pub(crate) async fn rpc_confirm_totp(
        &self,
        _: Request<pb::ConfirmTotpRequest>,
    ) -> Result<Response<pb::ConfirmTotpResponse>, Status> {
        Err(not_built("ConfirmTotp"))
    }

    pub(crate) async fn rpc_disable_totp(
        &self,
        _: Request<pb::DisableTotpRequest>,
    ) -> Result<Response<pb::DisableTotpResponse>, Status> {
        Err(not_built("DisableTotp"))
    }

    /// Login's second step for an account with TOTP enrolled: a current
    /// code or an unused recovery code, else UNAUTHENTICATED.
    pub(crate) async fn check_second_factor(
        &self,
        _conn: &mut AsyncPgConnection,
        _account: &Account,
        _totp_code: &str,
        _recovery_code: &str,
    ) -> Result<(), AuthError> {
        // Never let an enrolled account in on the password alone.
        Err(AuthError::Unauthenticated("second factor required"))
    }
}
