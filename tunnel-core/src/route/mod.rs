//! Routing vocabulary: where a stream goes ([`Target`]), which node a request names
//! ([`NodeRef`]), and the ports of the server's ConfigMap ([`PortSet`], [`config`]). Pure and
//! table-driven.

pub mod config;

pub use config::{PortConfig, PortPolicy};

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The host part of a target, as the agent understands it. The agent maps each kind to an address
/// it may dial; the server never sends an arbitrary address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetHost {
    /// The node's own primary address.
    Node,
    /// One specific address of the node (must be one of the IPs in its certificate).
    NodeIp(IpAddr),
    /// The node's loopback interface.
    Loopback,
}

/// A host kind and a port on the agent's node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// Which of the node's addresses.
    pub host: TargetHost,
    /// TCP port, never 0.
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host {
            TargetHost::Node => write!(f, "node:{}", self.port),
            TargetHost::NodeIp(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            TargetHost::NodeIp(ip) => write!(f, "{ip}:{}", self.port),
            TargetHost::Loopback => write!(f, "loopback:{}", self.port),
        }
    }
}

/// How a client named the node: by name (SNI, Host, CONNECT) or by one of its IPs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeRef {
    /// A node name, lowercased.
    Name(String),
    /// A node IP; it maps to a node only through a connected agent's certificate.
    Ip(IpAddr),
}

impl fmt::Display for NodeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// Why an authority (`host[:port]`) or host name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// Nothing where a host was expected.
    #[error("empty host")]
    Empty,
    /// The port is not a number in 1..=65535.
    #[error("invalid port {0:?}: a number from 1 to 65535")]
    Port(String),
    /// The host is neither an IP literal nor a DNS name (RFC 1123 labels, at most 253 bytes).
    #[error("{0:?} is not a valid DNS name or IP")]
    Host(String),
}

/// Longest DNS name accepted as a node name.
pub const MAX_HOST_LEN: usize = 253;

/// Parses a node name or IP literal (without port), as found in SNI or a Host header.
pub fn parse_host(host: &str) -> Result<NodeRef, AuthorityError> {
    if host.is_empty() {
        return Err(AuthorityError::Empty);
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(NodeRef::Ip(ip));
    }
    // A trailing dot names the same node in absolute form.
    let name = host.strip_suffix('.').unwrap_or(host);
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > MAX_HOST_LEN || !name.split('.').all(valid_label) {
        return Err(AuthorityError::Host(truncate(host)));
    }
    Ok(NodeRef::Name(name.to_ascii_lowercase()))
}

/// Parses `host[:port]` (IPv6 in brackets), using `default_port` when none is given.
pub fn parse_authority(
    authority: &str,
    default_port: u16,
) -> Result<(NodeRef, u16), AuthorityError> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| AuthorityError::Host(truncate(authority)))?;
        match after.strip_prefix(':') {
            Some(p) => (ip, Some(p)),
            None if after.is_empty() => (ip, None),
            None => return Err(AuthorityError::Host(truncate(authority))),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => (authority, None), // bare IPv6
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| AuthorityError::Port(truncate(p)))?,
    };
    Ok((parse_host(host)?, port))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A set of TCP ports, written in ConfigMaps as `10250, 10255`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PortSet(BTreeSet<u16>);

/// A malformed item in a port list: the ConfigMap key is added by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port {item:?} in port list")]
pub struct PortListError {
    /// The offending item, trimmed.
    pub item: String,
}

impl PortSet {
    /// The ports in `ports`.
    pub fn new(ports: impl IntoIterator<Item = u16>) -> Self {
        Self(ports.into_iter().collect())
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0.contains(&port)
    }

    /// The ports, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().copied()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// This set and `other` together.
    pub fn union(&self, other: &Self) -> Self {
        Self(self.0.union(&other.0).copied().collect())
    }
}

impl FromStr for PortSet {
    type Err = PortListError;

    /// Comma-separated ports; whitespace around items and empty items are allowed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = BTreeSet::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let port = item
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| PortListError {
                    item: truncate(item),
                })?;
            set.insert(port);
        }
        Ok(Self(set))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        let name = |s: &str| NodeRef::Name(s.into());
        let ip = |s: &str| NodeRef::Ip(s.parse().unwrap());
        let ok = [
            ("node-a:10250", 10255, name("node-a"), 10250),
            ("Node-A", 10255, name("node-a"), 10255),
            ("node-a.", 1, name("node-a"), 1),
            ("10.0.0.5:9100", 10255, ip("10.0.0.5"), 9100),
            ("[::1]:8080", 1, ip("::1"), 8080),
            ("[fe80::1]", 10255, ip("fe80::1"), 10255),
            ("fe80::1", 10255, ip("fe80::1"), 10255),
        ];
        for (input, default, host, port) in ok {
            assert_eq!(parse_authority(input, default), Ok((host, port)), "{input}");
        }
        let bad = [
            ("", AuthorityError::Empty),
            (":80", AuthorityError::Empty),
            ("node-a:0", AuthorityError::Port("0".into())),
            ("node-a:99999", AuthorityError::Port("99999".into())),
            ("node_a:80", AuthorityError::Host("node_a".into())),
            ("-node:80", AuthorityError::Host("-node".into())),
            ("a..b", AuthorityError::Host("a..b".into())),
            ("[::1", AuthorityError::Host("[::1".into())),
            ("[::1]x", AuthorityError::Host("[::1]x".into())),
        ];
        for (input, err) in bad {
            assert_eq!(parse_authority(input, 80), Err(err), "{input:?}");
        }
        assert!(parse_host(&"a".repeat(254)).is_err());
    }

    #[test]
    fn port_lists_allow_whitespace_and_name_the_bad_item() {
        let set: PortSet = " 10250,10255 , 10266,, 10267 ".parse().unwrap();
        assert_eq!(set.to_string(), "10250,10255,10266,10267");
        assert!(set.contains(10266) && !set.contains(9100));
        assert_eq!(
            "10250, 10x55".parse::<PortSet>(),
            Err(PortListError {
                item: "10x55".into()
            })
        );
        assert_eq!(
            "0".parse::<PortSet>(),
            Err(PortListError { item: "0".into() })
        );
    }
}
