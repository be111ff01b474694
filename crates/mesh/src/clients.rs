//! The channel factory: a typed client for any Trellis service, at the
//! address configured for it (`[services.<name>] address`), or this very
//! server when the service is mounted here — over the in-process link
//! ([`crate::local`]) when the process has one, else its own listener.
//! Every call made through it carries the caller's request id, remaining
//! deadline and credentials.
//!
//! Channels are lazy (nothing connects until the first call) and shared:
//! one HTTP/2 connection per target, multiplexing every call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use trellis_core::ServiceName;
use trellis_core::config::ServicesConfig;

use crate::context::CallContext;
use crate::local::LocalLink;

/// How a process reaches the services it mounts itself.
#[derive(Debug, Clone)]
pub enum Local {
    /// Its own listener, over loopback TCP.
    Addr(SocketAddr),
    /// Its in-process link.
    Link(LocalLink),
}

impl From<SocketAddr> for Local {
    fn from(a: SocketAddr) -> Local {
        Local::Addr(a)
    }
}

impl From<LocalLink> for Local {
    fn from(l: LocalLink) -> Local {
        Local::Link(l)
    }
}

/// Interceptor forwarding a [`CallContext`] on every request.
#[derive(Debug, Clone)]
pub struct Forward(pub CallContext);

impl Interceptor for Forward {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(left) = self.0.apply(req.metadata_mut())? {
            req.set_timeout(left);
        }
        Ok(req)
    }
}

/// A client type over a forwarding channel.
pub type MeshChannel = InterceptedService<Channel, Forward>;

/// Channels to every service this process can reach.
#[derive(Debug, Clone, Default)]
pub struct MeshClients {
    channels: HashMap<ServiceName, Channel>,
}

impl MeshClients {
    /// Builds channels from configuration: an explicit address wins; a
    /// service mounted locally is reached through `local`; others are absent.
    pub fn new(
        services: &ServicesConfig,
        local: impl Into<Local>,
        mounted: &[ServiceName],
    ) -> Result<MeshClients, tonic::transport::Error> {
        let local = local.into();
        let mut channels = HashMap::new();
        for name in ServiceName::ALL {
            let channel = match (services.endpoint(name), &local) {
                (Some(ep), _) => lazy_channel(&ep.address)?,
                (None, _) if !mounted.contains(&name) => continue,
                (None, Local::Addr(a)) => lazy_channel(&format!("http://{}", connectable(*a)))?,
                (None, Local::Link(link)) => in_process_channel(link.clone()),
            };
            channels.insert(name, channel);
        }
        Ok(MeshClients { channels })
    }

    /// The shared channel to `name`, or UNAVAILABLE when nowhere to be found.
    pub fn channel(&self, name: ServiceName) -> Result<Channel, tonic::Status> {
        self.channels.get(&name).cloned().ok_or_else(|| {
            tonic::Status::unavailable(format!(
                "service {name} is not enabled here and no address is configured for it (services.{name}.address)"
            ))
        })
    }

    /// A typed client for `name` that forwards `ctx`, e.g.
    /// `clients.client(ServiceName::System, &ctx, SystemServiceClient::new)`.
    pub fn client<C>(
        &self,
        name: ServiceName,
        ctx: &CallContext,
        make: impl FnOnce(MeshChannel) -> C,
    ) -> Result<C, tonic::Status> {
        let channel = self.channel(name)?;
        Ok(make(InterceptedService::new(channel, Forward(ctx.clone()))))
    }
}

/// The address to dial for a listener: a wildcard bind is reached on loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

fn lazy_channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(address.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// A channel that dials this process's server over `link`; like a socket
/// channel, it connects on first use and again after the connection ends.
fn in_process_channel(link: LocalLink) -> Channel {
    Endpoint::from_static("http://in-process.trellis").connect_with_connector_lazy(
        tower::service_fn(move |_: http::Uri| {
            let dialled = link.dial();
            async move { dialled }
        }),
    )
}
