//! The channel factory: a typed client for any Trellis service, at the
//! address configured for it (`[services.<name>] address`), or this very
//! server when the service is mounted here. Every call made through it
//! carries the caller's request id, remaining deadline and credentials.
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
    /// service mounted locally is reached at `local`; others are absent.
    pub fn new(
        services: &ServicesConfig,
        local: SocketAddr,
        mounted: &[ServiceName],
    ) -> Result<MeshClients, tonic::transport::Error> {
        let local_url = format!("http://{}", connectable(local));
        let mut channels = HashMap::new();
        for name in ServiceName::ALL {
            let address = match services.endpoint(name) {
                Some(ep) => ep.address.clone(),
                None if mounted.contains(&name) => local_url.clone(),
                None => continue,
            };
            channels.insert(name, lazy_channel(&address)?);
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
