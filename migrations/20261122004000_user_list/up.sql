-- Holders of a role, by role: ListUsers' role filter, ListRoles' user
-- counts, DeleteRole's assignment check and forced unassignment, and the
-- foreign key from user_roles to roles all look assignments up by role,
-- which the primary key (user_id, role) cannot serve.
CREATE INDEX user_roles_role ON user_roles (role, user_id);
