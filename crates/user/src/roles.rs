//! Roles: listing, creating, changing and deleting them, assigning and
//! revoking them, and answering permission checks.

use tonic::{Request, Response, Status};
use trellis_proto::user::v1 as pb;

use crate::service::{UserSvc, not_built};

impl UserSvc {
    pub(crate) async fn rpc_list_roles(&self, _: Request<pb::ListRolesRequest>) -> Result<Response<pb::ListRolesResponse>, Status> {
        Err(not_built("ListRoles"))
    }

    pub(crate) async fn rpc_create_role(&self, _: Request<pb::CreateRoleRequest>) -> Result<Response<pb::CreateRoleResponse>, Status> {
        Err(not_built("CreateRole"))
    }

    pub(crate) async fn rpc_update_role(&self, _: Request<pb::UpdateRoleRequest>) -> Result<Response<pb::UpdateRoleResponse>, Status> {
        Err(not_built("UpdateRole"))
    }

    pub(crate) async fn rpc_delete_role(&self, _: Request<pb::DeleteRoleRequest>) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        Err(not_built("DeleteRole"))
    }

    pub(crate) async fn rpc_assign_role(&self, _: Request<pb::AssignRoleRequest>) -> Result<Response<pb::AssignRoleResponse>, Status> {
        Err(not_built("AssignRole"))
    }

    pub(crate) async fn rpc_revoke_role(&self, _: Request<pb::RevokeRoleRequest>) -> Result<Response<pb::RevokeRoleResponse>, Status> {
        Err(not_built("RevokeRole"))
    }

    pub(crate) async fn rpc_check_permission(
        &self,
        _: Request<pb::CheckPermissionRequest>,
    ) -> Result<Response<pb::CheckPermissionResponse>, Status> {
        Err(not_built("CheckPermission"))
    }
}
