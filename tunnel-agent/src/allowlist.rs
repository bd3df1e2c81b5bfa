//! Which local targets a stream may reach. Pure: the decision is made before any dial.
//!
//! The agent dials only its node's own IPs (from its certificate) and loopback, only on allowed
//! ports. A port in `localhost-proxy-ports` is dialed on 127.0.0.1, whatever host the server
//! named; a port in `allowed-ports` is dialed on the named node IP (which must be one of ours) or
//! our first node IP. Anything else is refused as forbidden.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tunnel_core::{PortSet, Target, TargetHost};

/// The agent's dial policy.
#[derive(Debug, Clone)]
pub struct Allowlist {
    node_ips: Vec<IpAddr>,
    allowed_ports: PortSet,
    localhost_ports: PortSet,
}

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// The port is in neither list.
    #[error("port {0} is not allowed")]
    Port(u16),
    /// The IP is not one of this node's.
    #[error("{0} is not an address of this node")]
    ForeignIp(IpAddr),
    /// Loopback was asked for a port that is only served on the node IPs.
    #[error("port {0} is not served on loopback")]
    Loopback(u16),
    /// The node has no IP to dial.
    #[error("this node has no IP in its certificate")]
    NoNodeIp,
}

impl Allowlist {
    /// A policy for a node with `node_ips`.
    pub fn new(node_ips: Vec<IpAddr>, allowed_ports: PortSet, localhost_ports: PortSet) -> Self {
        Self {
            node_ips,
            allowed_ports,
            localhost_ports,
        }
    }

    /// The address to dial for `target`, or why not.
    pub fn resolve(&self, target: &Target) -> Result<SocketAddr, Denied> {
        let port = target.port;
        if self.localhost_ports.contains(port) {
            return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
        }
        if !self.allowed_ports.contains(port) {
            return Err(Denied::Port(port));
        }
        let ip = match target.host {
            TargetHost::Node => *self.node_ips.first().ok_or(Denied::NoNodeIp)?,
            TargetHost::NodeIp(ip) if self.node_ips.contains(&ip) => ip,
            TargetHost::NodeIp(ip) => return Err(Denied::ForeignIp(ip)),
            TargetHost::Loopback => return Err(Denied::Loopback(port)),
        };
        Ok(SocketAddr::new(ip, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Allowlist {
        Allowlist::new(
            vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            PortSet::new([10250, 10255, 9100]),
            PortSet::new([10250, 10255, 10266, 10267]),
        )
    }

    #[test]
    fn table() {
        let t = |host, port| Target { host, port };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let node_ip = |s: &str| TargetHost::NodeIp(ip(s));
        let cases: Vec<(Target, Result<SocketAddr, Denied>)> = vec![
            (
                t(TargetHost::Node, 10250),
                Ok("127.0.0.1:10250".parse().unwrap()),
            ),
            (
                t(node_ip("10.0.0.5"), 10255),
                Ok("127.0.0.1:10255".parse().unwrap()),
            ),
            (
                t(TargetHost::Loopback, 10267),
                Ok("127.0.0.1:10267".parse().unwrap()),
            ),
            (
                t(TargetHost::Node, 9100),
                Ok("10.0.0.5:9100".parse().unwrap()),
            ),
            (
                t(node_ip("fd00::5"), 9100),
                Ok("[fd00::5]:9100".parse().unwrap()),
            ),
            (
                t(node_ip("10.0.0.6"), 9100),
                Err(Denied::ForeignIp(ip("10.0.0.6"))),
            ),
            (
                t(node_ip("169.254.169.254"), 9100),
                Err(Denied::ForeignIp(ip("169.254.169.254"))),
            ),
            (t(TargetHost::Loopback, 9100), Err(Denied::Loopback(9100))),
            (t(TargetHost::Node, 22), Err(Denied::Port(22))),
            (t(TargetHost::Loopback, 6443), Err(Denied::Port(6443))),
            (t(node_ip("10.0.0.5"), 2379), Err(Denied::Port(2379))),
        ];
        let p = policy();
        for (target, want) in cases {
            assert_eq!(p.resolve(&target), want, "{target}");
        }
        let no_ips = Allowlist::new(vec![], PortSet::new([9100]), PortSet::default());
        assert_eq!(
            no_ips.resolve(&t(TargetHost::Node, 9100)),
            Err(Denied::NoNodeIp)
        );
    }
}
