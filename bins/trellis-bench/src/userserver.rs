//! The reference for `user-get` (`trellis-bench user-server`, hidden): a
//! bare tonic server answering `trellis.user.v1.UserService/GetUser` by
//! running the same query as trellisd's handler — the profile columns of
//! the row by id with the account's roles as an array, in one SELECT — with
//! tokio-postgres on a small pool of connections, the statement prepared
//! once. Two ways to use the connections, one reference each:
//!
//! - pooled (`user-get-raw`): a call has a connection to itself, as a
//!   checkout from a pool gives (no pipelining of several calls' queries on
//!   one connection);
//! - `--multiplexed` (`user-get-raw-mux`): as trellisd's GetUser does, a
//!   few connections — one per CPU this process may run on, at most 8,
//!   trellisd's default for `database.multiplexed_connections` — shared by
//!   every call in turn, tokio-postgres pipelining the queries of
//!   concurrent calls on each.
//!
//! No authentication, no layers; every other method of the service is
//! UNIMPLEMENTED. So the difference between `user-get-raw-mux` and
//! `user-get` is what the mesh, the token check and diesel-async add to one
//! lookup made the same way.
//!
//! It exits when its standard input closes, like the baseline server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::Context as _;
use chrono::{DateTime, NaiveDate, Utc};
use futures::future::BoxFuture;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_postgres::{Client, NoTls, Row, Statement};
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use trellis_proto::user::v1 as pb;
use uuid::Uuid;

/// Flags of `user-server`.
#[derive(clap::Args, Debug)]
pub struct UserServerArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The migrated database holding `users` and `user_roles`.
    #[arg(long, env = "TRELLIS_BENCH_DATABASE_URL")]
    pub database_url: String,
    /// Connections in the pool (trellisd's holds 16).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Share one connection per allowed CPU (at most 8) between all calls,
    /// queries pipelined, instead of a pool; `--connections` is ignored.
    #[arg(long)]
    pub multiplexed: bool,
}

/// trellisd's GetUser query: the profile columns its `UserRow` selects, in
/// its order, and the roles.
const USER: &str = "SELECT id, email, username, display_name, first_name, last_name, phone, \
     date_of_birth, bio, avatar_url, locale, time_zone, status, email_verified_at, created_at, \
     updated_at, deleted_at, \
     ARRAY(SELECT r.role FROM user_roles r WHERE r.user_id = users.id ORDER BY r.role) \
     FROM users WHERE id = $1";

pub fn main(args: UserServerArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("user-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("user-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: UserServerArgs) -> anyhow::Result<()> {
    let n = if args.multiplexed {
        std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
    } else {
        args.connections.max(1)
    };
    let db = Db::connect(&args.database_url, n, args.multiplexed).await?;
    let listener = TcpListener::bind(args.listen).await?;
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    Server::builder()
        .tcp_nodelay(true)
        .add_service(UserSvc(Arc::new(db)))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stdin_closed,
        )
        .await?;
    Ok(())
}

/// One connection and its prepared statement.
struct Conn {
    client: Client,
    user: Statement,
}

/// The pool: a call takes a free connection (waiting for one when all
/// are in use) and puts it back when done.
struct Db {
    free: Mutex<Vec<Conn>>,
    permits: Semaphore,
    /// `--multiplexed`: the connections every call shares, taken in turn.
    shared: Vec<Conn>,
    next: AtomicUsize,
}

/// A connection taken from the pool; returned on drop.
struct Lease<'a> {
    db: &'a Db,
    conn: Option<Conn>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let (Some(conn), Ok(mut free)) = (self.conn.take(), self.db.free.lock()) {
            free.push(conn);
            self.db.permits.add_permits(1);
        }
    }
}

impl Db {
    async fn connect(url: &str, n: usize, multiplexed: bool) -> anyhow::Result<Db> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let (client, connection) = tokio_postgres::connect(url, NoTls)
                .await
                .context("connecting to PostgreSQL")?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let user = client.prepare(USER).await?;
            conns.push(Conn { client, user });
        }
        let (free, shared) = if multiplexed {
            (Vec::new(), conns)
        } else {
            (conns, Vec::new())
        };
        Ok(Db {
            permits: Semaphore::new(free.len()),
            free: Mutex::new(free),
            shared,
            next: AtomicUsize::new(0),
        })
    }

    async fn lease(&self) -> Result<Lease<'_>, Status> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Status::unavailable("pool closed"))?;
        // The permit goes back with the connection, in `Lease::drop`.
        permit.forget();
        let conn = self
            .free
            .lock()
            .map_err(|_| Status::internal("pool poisoned"))?
            .pop();
        Ok(Lease {
            db: self,
            conn: Some(conn.ok_or_else(|| Status::internal("pool empty"))?),
        })
    }

    async fn get_user(&self, id: Uuid) -> Result<Option<pb::User>, Status> {
        let db_err = |e: tokio_postgres::Error| Status::internal(e.to_string());
        if !self.shared.is_empty() {
            let c = &self.shared[self.next.fetch_add(1, Ordering::Relaxed) % self.shared.len()];
            let Some(row) = c.client.query_opt(&c.user, &[&id]).await.map_err(db_err)? else {
                return Ok(None);
            };
            return user(&row).map(Some).map_err(db_err);
        }
        let lease = self.lease().await?;
        let c = lease
            .conn
            .as_ref()
            .ok_or_else(|| Status::internal("no connection"))?;
        let Some(row) = c.client.query_opt(&c.user, &[&id]).await.map_err(db_err)? else {
            return Ok(None);
        };
        user(&row).map(Some).map_err(db_err)
    }
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The wire form, as trellisd's `user_pb` builds it.
fn user(r: &Row) -> Result<pb::User, tokio_postgres::Error> {
    let status: String = r.try_get(12)?;
    Ok(pb::User {
        id: r.try_get::<_, Uuid>(0)?.to_string(),
        email: r.try_get(1)?,
        username: r.try_get(2)?,
        display_name: r.try_get(3)?,
        first_name: r.try_get(4)?,
        last_name: r.try_get(5)?,
        phone: r.try_get(6)?,
        date_of_birth: r
            .try_get::<_, Option<NaiveDate>>(7)?
            .map(|d| d.format("%Y-%m-%d").to_string())
            .unwrap_or_default(),
        bio: r.try_get(8)?,
        avatar_url: r.try_get(9)?,
        locale: r.try_get(10)?,
        time_zone: r.try_get(11)?,
        status: match status.as_str() {
            "active" => pb::UserStatus::Active,
            "inactive" => pb::UserStatus::Inactive,
            "suspended" => pb::UserStatus::Suspended,
            _ => pb::UserStatus::Unspecified,
        } as i32,
        roles: r.try_get(17)?,
        email_verified: r.try_get::<_, Option<DateTime<Utc>>>(13)?.is_some(),
        create_time: Some(ts(r.try_get(14)?)),
        update_time: Some(ts(r.try_get(15)?)),
        delete_time: r.try_get::<_, Option<DateTime<Utc>>>(16)?.map(ts),
    })
}

/// The service: routes GetUser, refuses the rest, as the generated server
/// does for unknown methods.
#[derive(Clone)]
struct UserSvc(Arc<Db>);

impl NamedService for UserSvc {
    const NAME: &'static str = pb::SERVICE_NAME;
}

/// GetUser as a tonic unary service.
struct GetUser(Arc<Db>);

impl UnaryService<pb::GetUserRequest> for GetUser {
    type Response = pb::GetUserResponse;
    type Future = BoxFuture<'static, Result<Response<pb::GetUserResponse>, Status>>;

    fn call(&mut self, req: Request<pb::GetUserRequest>) -> Self::Future {
        let db = self.0.clone();
        Box::pin(async move {
            let id = Uuid::parse_str(&req.get_ref().id)
                .map_err(|_| Status::invalid_argument("id is not a UUID"))?;
            match db.get_user(id).await? {
                Some(user) => Ok(Response::new(pb::GetUserResponse { user: Some(user) })),
                None => Err(Status::not_found("no such user")),
            }
        })
    }
}

impl tower::Service<http::Request<Body>> for UserSvc {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == "/trellis.user.v1.UserService/GetUser" {
            let method = GetUser(self.0.clone());
            Box::pin(async move {
                let mut grpc = Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(method, req).await)
            })
        } else {
            Box::pin(async { Ok(Status::new(Code::Unimplemented, "").into_http()) })
        }
    }
}
