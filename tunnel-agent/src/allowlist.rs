//! Which local targets a stream may reach. Pure: the decision is made before any dial.
//!
//! The agent dials only its node's own IPs (from its certificate) and loopback, only on allowed
//! ports. Which ports, and where: the server's port policy when it sent one (its
//! configuration's ports, the `localhost-proxy-ports` on loopback), narrowed by the agent's own
//! `--allowed-ports` (node IPs) and `--localhost-proxy-ports` (loopback) when they are given,
//! never widened. Without a policy (an older server) the flags, or their defaults, decide. A
//! loopback port is dialed on 127.0.0.1 whatever host the server named; a node port on the
//! named node IP (which must be one of ours) or our first node IP. Anything else is refused as
//! forbidden.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tunnel_core::{PortPolicy, PortSet, Target, TargetHost};

/// `--allowed-ports` when not given and the server sends no policy.
pub const DEFAULT_ALLOWED_PORTS: [u16; 2] = [10250, 10255];
/// `--localhost-proxy-ports` when not given and the server sends no policy.
pub const DEFAULT_LOCALHOST_PROXY_PORTS: [u16; 4] = [10250, 10255, 10266, 10267];

/// The agent's dial policy.
#[derive(Debug, Clone)]
pub struct Allowlist {
    node_ips: Vec<IpAddr>,
    allowed_ports: Option<PortSet>,
    localhost_ports: Option<PortSet>,
    defaults: PortPolicy,
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
    /// A policy for a node with `node_ips`; `allowed_ports` and `localhost_ports` are the
    /// flags, `None` when not given.
    pub fn new(
        node_ips: Vec<IpAddr>,
        allowed_ports: Option<PortSet>,
        localhost_ports: Option<PortSet>,
    ) -> Self {
        let defaults = PortPolicy {
            node: allowed_ports
                .clone()
                .unwrap_or_else(|| PortSet::new(DEFAULT_ALLOWED_PORTS)),
            loopback: localhost_ports
                .clone()
                .unwrap_or_else(|| PortSet::new(DEFAULT_LOCALHOST_PROXY_PORTS)),
        };
        Self {
            node_ips,
            allowed_ports,
            localhost_ports,
            defaults,
        }
    }

    /// Whether `port` is dialed on loopback (`Some(true)`), on a node IP (`Some(false)`), or
    /// not at all, under the server's policy `pushed` (`None`: it sent none).
    fn mode(&self, port: u16, pushed: Option<&PortPolicy>) -> Option<bool> {
        let narrowed = |flag: &Option<PortSet>| flag.as_ref().is_none_or(|f| f.contains(port));
        let (loopback, node) = match pushed {
            None => (
                self.defaults.loopback.contains(port),
                self.defaults.node.contains(port),
            ),
            Some(p) => (
                p.loopback.contains(port) && narrowed(&self.localhost_ports),
                p.node.contains(port) && narrowed(&self.allowed_ports),
            ),
        };
        if loopback {
            Some(true)
        } else if node {
            Some(false)
        } else {
            None
        }
    }

    /// What the agent serves under the server's policy `pushed` (`None`: it sent none).
    pub fn effective(&self, pushed: Option<&PortPolicy>) -> PortPolicy {
        let Some(p) = pushed else {
            return self.defaults.clone();
        };
        let ports = p.node.union(&p.loopback);
        PortPolicy {
            node: PortSet::new(
                ports
                    .iter()
                    .filter(|q| self.mode(*q, pushed) == Some(false)),
            ),
            loopback: PortSet::new(ports.iter().filter(|q| self.mode(*q, pushed) == Some(true))),
        }
    }

    /// The address to dial for `target` under the server's policy `pushed`, or why not.
    pub fn resolve(
        &self,
        target: &Target,
        pushed: Option<&PortPolicy>,
    ) -> Result<SocketAddr, Denied> {
        let port = target.port;
        match self.mode(port, pushed) {
            Some(true) => return Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)),
            Some(false) => {}
            None => return Err(Denied::Port(port)),
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
            Some(PortSet::new([10250, 10255, 9100])),
            None,
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
            assert_eq!(p.resolve(&target, None), want, "{target}");
        }
        let no_ips = Allowlist::new(vec![], Some(PortSet::new([9100])), Some(PortSet::default()));
        assert_eq!(
            no_ips.resolve(&t(TargetHost::Node, 9100), None),
            Err(Denied::NoNodeIp)
        );
    }

    #[test]
    fn the_servers_policy_is_narrowed_by_the_flags_never_widened() {
        let t = |port| Target {
            host: TargetHost::Node,
            port,
        };
        let ip = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let pushed = PortPolicy {
            node: PortSet::new([9100, 9051, 8443]),
            loopback: PortSet::new([10250, 10255, 8080]),
        };
        // No flags: the server decides, beyond the defaults.
        let open = Allowlist::new(vec!["10.0.0.5".parse().unwrap()], None, None);
        assert_eq!(
            open.resolve(&t(9100), Some(&pushed)),
            Ok(ip("10.0.0.5:9100"))
        );
        assert_eq!(
            open.resolve(&t(8080), Some(&pushed)),
            Ok(ip("127.0.0.1:8080"))
        );
        assert_eq!(
            open.resolve(&t(10266), Some(&pushed)),
            Err(Denied::Port(10266))
        );
        assert_eq!(open.resolve(&t(9100), None), Err(Denied::Port(9100)));
        assert_eq!(open.effective(Some(&pushed)), pushed);

        // Flags narrow: 9051 is not in --allowed-ports, 8080 not in --localhost-proxy-ports.
        let narrow = Allowlist::new(
            vec!["10.0.0.5".parse().unwrap()],
            Some(PortSet::new([9100, 8443, 22])),
            Some(PortSet::new([10250, 10255, 6443])),
        );
        assert_eq!(
            narrow.resolve(&t(9100), Some(&pushed)),
            Ok(ip("10.0.0.5:9100"))
        );
        assert_eq!(
            narrow.resolve(&t(9051), Some(&pushed)),
            Err(Denied::Port(9051))
        );
        assert_eq!(
            narrow.resolve(&t(8080), Some(&pushed)),
            Err(Denied::Port(8080))
        );
        // ...and never widen: 22 and 6443 are in the flags, not in the policy.
        assert_eq!(narrow.resolve(&t(22), Some(&pushed)), Err(Denied::Port(22)));
        assert_eq!(
            narrow.resolve(&t(6443), Some(&pushed)),
            Err(Denied::Port(6443))
        );
        let effective = narrow.effective(Some(&pushed));
        assert_eq!(effective.node.to_string(), "8443,9100");
        assert_eq!(effective.loopback.to_string(), "10250,10255");
        // Without a policy, the flags alone.
        assert_eq!(narrow.resolve(&t(22), None), Ok(ip("10.0.0.5:22")));
    }
}
