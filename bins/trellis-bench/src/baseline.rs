//! The reference server (`trellis-bench baseline-server`, hidden): the same
//! SystemService handler trellisd mounts, on a bare tonic server — no
//! layers, no router extras, no gRPC-web — so the difference between the
//! `baseline` and `mesh-noop` scenarios is what the mesh adds.
//!
//! It exits when its standard input closes, which is how it follows the
//! bench that started it even when the bench is killed outright.

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use trellis_mesh::system::System;

/// Flags of `baseline-server`.
#[derive(clap::Args, Debug)]
pub struct BaselineArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Service names GetInfo reports (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = trellis_proto::system::v1::SERVICE_NAME)]
    pub services: Vec<String>,
    /// Enabled short names GetInfo reports (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "system")]
    pub enabled: Vec<String>,
}

/// trellisd's default `server.max_message_bytes`.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

pub fn main(args: BaselineArgs) -> ExitCode {
    // Same runtime as trellisd's `#[tokio::main]`: one worker per CPU the
    // process may use.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baseline-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baseline-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: BaselineArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let system = System::new(args.services, args.enabled).into_server(MAX_MESSAGE_BYTES);
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
        .add_service(system)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stdin_closed,
        )
        .await?;
    Ok(())
}
