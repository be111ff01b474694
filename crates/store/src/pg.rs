//! PostgreSQL through diesel-async on a bb8 pool.

use std::time::Duration;

use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::pooled_connection::bb8::{Pool, PooledConnection};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::StoreError;

pub type PgPool = Pool<AsyncPgConnection>;
pub type PgConn<'a> = PooledConnection<'a, AsyncPgConnection>;

/// A lazy pool: connections are opened on demand, never at construction.
pub fn pool(url: &str, size: u32, acquire_timeout: Duration) -> PgPool {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
    Pool::builder()
        .max_size(size)
        .min_idle(Some(0))
        .connection_timeout(acquire_timeout)
        // A connection that broke while the server was down is found out on
        // checkout rather than handed to a request.
        .test_on_check_out(true)
        .build_unchecked(manager)
}

/// `SELECT 1` on a pooled connection.
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    let mut conn = pool
        .get()
        .await
        .map_err(|_| StoreError::Unavailable("database"))?;
    diesel::sql_query("SELECT 1").execute(&mut conn).await?;
    Ok(())
}
