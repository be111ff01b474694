//! The client's address: the socket's peer, or — when that peer is one of
//! `server.trusted_proxies` — the nearest address in `X-Forwarded-For` that
//! is not itself a trusted proxy (read from the right, as each proxy
//! appends the address it received the call from). Left for handlers as a
//! [`ClientIp`] request extension: per-IP limits, sessions and the audit
//! trail use it. Without trusted proxies the header is ignored, so a client
//! cannot choose its own address.

use std::net::IpAddr;
use std::sync::Arc;

use http::Request;
use ipnet::IpNet;
use tonic::transport::server::TcpConnectInfo;
use tower::util::MapRequestLayer;

use crate::context::ClientIp;

/// `X-Forwarded-For` entries looked at, at most (from the right).
const MAX_HOPS: usize = 16;

/// The layer: resolves the address once per call.
pub fn layer<B>(trusted: Vec<IpNet>) -> MapRequestLayer<impl Fn(Request<B>) -> Request<B> + Clone> {
    let trusted: Arc<[IpNet]> = trusted.into();
    MapRequestLayer::new(move |mut req: Request<B>| {
        let peer = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
            .map(|a| a.ip());
        if let Some(ip) = peer.map(|p| resolve(&trusted, p, req.headers())) {
            req.extensions_mut().insert(ClientIp(ip));
        }
        req
    })
}

/// The client of a call that arrived from `peer` with `headers`.
pub fn resolve(trusted: &[IpNet], peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.rsplit(','))
        .take(MAX_HOPS);
    for hop in hops {
        let Some(ip) = parse_hop(hop) else {
            // Garbage: nothing to its left can be believed.
            break;
        };
        client = ip;
        if !is_trusted(&ip) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, maybe with a port
/// (`1.2.3.4:5678`, `[::1]:5678`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    hop.parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| canonical(a.ip()))
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid")
    }

    fn headers(xff: &[&str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().expect("valid"));
        }
        h
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let h = headers(&["203.0.113.9"]);
        assert_eq!(resolve(&[], ip("198.51.100.1"), &h), ip("198.51.100.1"));
    }

    #[test]
    fn an_untrusted_peer_cannot_choose_its_address() {
        let trusted = ["10.0.0.0/8".parse().expect("valid")];
        let h = headers(&["203.0.113.9"]);
        assert_eq!(
            resolve(&trusted, ip("198.51.100.1"), &h),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        let trusted = ["10.0.0.0/8".parse().expect("valid")];
        // The client forged the first entry; proxy 10.1.1.1 appended the
        // address it saw, and so did 10.2.2.2.
        let h = headers(&["6.6.6.6, 203.0.113.9", "10.1.1.1"]);
        assert_eq!(resolve(&trusted, ip("10.2.2.2"), &h), ip("203.0.113.9"));
        let h = headers(&["[2001:db8::7]:4711, 10.1.1.1:80"]);
        assert_eq!(resolve(&trusted, ip("10.2.2.2"), &h), ip("2001:db8::7"));
    }

    #[test]
    fn garbage_stops_the_walk_and_mapped_addresses_are_ipv4() {
        let trusted = ["10.0.0.0/8".parse().expect("valid")];
        let h = headers(&["203.0.113.9, not-an-ip, 10.1.1.1"]);
        assert_eq!(resolve(&trusted, ip("10.2.2.2"), &h), ip("10.1.1.1"));
        assert_eq!(
            resolve(
                &trusted,
                ip("::ffff:10.2.2.2"),
                &headers(&["::ffff:203.0.113.9"])
            ),
            ip("203.0.113.9")
        );
        // Only proxies all the way: the farthest one is the best guess.
        assert_eq!(
            resolve(&trusted, ip("10.2.2.2"), &headers(&["10.3.3.3"])),
            ip("10.3.3.3")
        );
        // No header: the proxy itself.
        assert_eq!(
            resolve(&trusted, ip("10.2.2.2"), &headers(&[])),
            ip("10.2.2.2")
        );
    }
}
