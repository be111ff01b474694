DROP INDEX user_roles_role;
