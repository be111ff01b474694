//! ListUsers: search, filters, sort orders and keyset pagination.

use tonic::{Request, Response, Status};
use trellis_proto::user::v1 as pb;

use crate::service::{UserSvc, not_built};

impl UserSvc {
    pub(crate) async fn rpc_list_users(&self, _: Request<pb::ListUsersRequest>) -> Result<Response<pb::ListUsersResponse>, Status> {
        Err(not_built("ListUsers"))
    }
}
