//! API keys for services and automation: created with scopes and an
//! optional expiry, the secret shown once and stored hashed, listed and
//! revoked by their owner.

use tonic::{Request, Response, Status};
use trellis_proto::auth::v1 as pb;

use crate::service::{AuthSvc, not_built};

impl AuthSvc {
    pub(crate) async fn rpc_create_api_key(
        &self,
        _: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        Err(not_built("CreateApiKey"))
    }

    pub(crate) async fn rpc_list_api_keys(
        &self,
        _: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        Err(not_built("ListApiKeys"))
    }

    pub(crate) async fn rpc_revoke_api_key(
        &self,
        _: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        Err(not_built("RevokeApiKey"))
    }
}
