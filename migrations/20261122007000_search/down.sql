UPDATE roles
   SET permissions = array_remove(array_remove(array_remove(array_remove(permissions,
       'search:documents:read'), 'search:documents:write'), 'search:query:run'), 'search:history:*')
       || '{search:*}'::text[]
 WHERE name = 'member' AND builtin;
DROP TABLE search_history;
DROP TABLE search_documents;
