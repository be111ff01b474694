//! ListAuditEvents: the trail every service writes, filtered and paged.

use tonic::{Request, Response, Status};
use trellis_proto::user::v1 as pb;

use crate::service::{UserSvc, not_built};

impl UserSvc {
    pub(crate) async fn rpc_list_audit_events(
        &self,
        _: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        Err(not_built("ListAuditEvents"))
    }
}
