//! The in-process link: how a service reaches another one mounted in the
//! same process without the kernel. The mesh client of such a service
//! dials an in-memory pipe instead of the loopback socket, and the server
//! accepts the pipe beside its TCP connections, so the call is still a
//! real gRPC call — HTTP/2 framing, protobuf, every request-path layer
//! (authentication, deadline, metrics, tracing) — only without the
//! `writev`/`epoll`/`recvfrom` round of a socket per message, and without
//! waking the other end through the network stack.
//!
//! A link is made once per process ([`link`]): the [`LocalLink`] half goes
//! to [`MeshClients::new`](crate::MeshClients::new), the [`LocalIncoming`]
//! half to [`MeshBuilder::in_process`](crate::MeshBuilder::in_process).
//! When the server stops, the incoming half is dropped and dialling fails
//! with UNAVAILABLE, as a closed listener would.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes either direction of a pipe buffers before its writer waits.
const PIPE_BUFFER: usize = 256 * 1024;

/// Where an in-process call appears to come from: loopback, as the socket
/// it replaces did (per-IP limits and trusted proxies see no difference).
const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// The dialling half, cloned into every channel to a co-located service.
#[derive(Debug, Clone)]
pub struct LocalLink {
    tx: mpsc::UnboundedSender<DuplexStream>,
}

/// The accepting half, given to the server.
#[derive(Debug)]
pub struct LocalIncoming {
    pub(crate) rx: mpsc::UnboundedReceiver<DuplexStream>,
}

/// A new link between this process's mesh clients and its server.
pub fn link() -> (LocalLink, LocalIncoming) {
    let (tx, rx) = mpsc::unbounded_channel();
    (LocalLink { tx }, LocalIncoming { rx })
}

impl LocalLink {
    /// Opens one connection: the server end goes to the server's accept
    /// loop, the client end is returned.
    pub fn dial(&self) -> io::Result<TokioIo<DuplexStream>> {
        let (client, server) = tokio::io::duplex(PIPE_BUFFER);
        self.tx.send(server).map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "this process's server is not accepting calls",
            )
        })?;
        Ok(TokioIo::new(client))
    }
}

/// A connection the server accepted: from its listener or over the link.
#[derive(Debug)]
pub enum Conn {
    Tcp(TcpStream),
    Local(DuplexStream),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Tcp(s) => s.connect_info(),
            Conn::Local(_) => TcpConnectInfo {
                local_addr: Some(LOOPBACK),
                remote_addr: Some(LOOPBACK),
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Local(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Local(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Local(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Local(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Local(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Local(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
