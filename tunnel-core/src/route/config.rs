//! The server's port configuration, as operators write it in ConfigMap
//! `kube-system/edge-tunnel-server-cfg` (ACK@Edge and yurt-tunnel use the same keys):
//!
//! ```text
//! dnat-ports-pair: '9051=10264,9052=10264'    node port 9051 is plain HTTP through the HTTP front
//! http-proxy-ports: "9051"                    plain HTTP through the HTTP front
//! https-proxy-ports: "9052, 8080"             TLS passed through, on a front port of its own
//! localhost-proxy-ports: "10250, 10255, 10266, 10267, 8080"   dialed on the node's loopback
//! ```
//!
//! [`PortConfig::parse`] checks every item and names the key and the bad item of the first
//! error; [`PortConfig::policy`] is what the agents are told they may dial.

use std::collections::BTreeMap;
use std::fmt;

use super::PortSet;

/// Key of the node ports served as plain HTTP through the HTTP front, written as
/// `NODE_PORT=FRONT_PORT` pairs whose front port must be the HTTP front's.
pub const DNAT_PORTS_PAIR: &str = "dnat-ports-pair";
/// Key of the node ports served as plain HTTP through the HTTP front.
pub const HTTP_PROXY_PORTS: &str = "http-proxy-ports";
/// Key of the node ports served as TLS passthrough, each on a front port of the same number.
pub const HTTPS_PROXY_PORTS: &str = "https-proxy-ports";
/// Key of the node ports the agent dials on loopback instead of the node's IP.
pub const LOCALHOST_PROXY_PORTS: &str = "localhost-proxy-ports";
/// Every key [`PortConfig::parse`] reads.
pub const KEYS: [&str; 4] = [
    DNAT_PORTS_PAIR,
    HTTP_PROXY_PORTS,
    HTTPS_PROXY_PORTS,
    LOCALHOST_PROXY_PORTS,
];
/// `localhost-proxy-ports` when the key is absent: the kubelet's two ports and the two of the
/// node's own edge components.
pub const DEFAULT_LOCALHOST_PROXY_PORTS: [u16; 4] = [10250, 10255, 10266, 10267];
/// Most ports one key may list: far above any real configuration, and it bounds the policy
/// message every agent receives.
pub const MAX_PORTS_PER_KEY: usize = 1024;

/// What the configuration cannot change: the ports always served and the HTTP front's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedPorts {
    /// The server's HTTP front port, the only valid target of a dnat pair (10264).
    pub http_front: u16,
    /// The kubelet's port behind the TLS front, always served (10250).
    pub kubelet: u16,
    /// The kubelet's read-only port behind the HTTP front, always served (10255).
    pub kubelet_read_only: u16,
}

impl Default for FixedPorts {
    fn default() -> Self {
        Self {
            http_front: 10264,
            kubelet: 10250,
            kubelet_read_only: 10255,
        }
    }
}

/// A bad value, with the key it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct PortConfigError {
    /// The ConfigMap key.
    pub key: &'static str,
    /// What is wrong, naming the item.
    pub problem: PortProblem,
}

/// What is wrong with a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PortProblem {
    /// An item that is not a port number.
    #[error("invalid port {0:?}: a number from 1 to 65535")]
    Port(String),
    /// A port listed twice under one key.
    #[error("port {0} is listed twice")]
    Duplicate(u16),
    /// A dnat item that is not `NODE_PORT=FRONT_PORT`.
    #[error("invalid pair {0:?}: write NODE_PORT=FRONT_PORT, e.g. 9051=10264")]
    Pair(String),
    /// A dnat pair whose front port is not the HTTP front's.
    #[error("pair {item:?} targets port {target}: a pair must target the HTTP front port {front}")]
    PairTarget {
        /// The pair as written.
        item: String,
        /// Its front port.
        target: u16,
        /// The HTTP front port.
        front: u16,
    },
    /// A port that another key serves as the other protocol.
    #[error(
        "port {port} is also in {other}: a port is served either as plain HTTP or as TLS, not both"
    )]
    Conflict {
        /// The port.
        port: u16,
        /// The other key.
        other: &'static str,
    },
    /// A port that something else of the server's already listens on.
    #[error("port {port} is taken by {what}: the server listens on each https-proxy port itself")]
    Taken {
        /// The port.
        port: u16,
        /// What holds it.
        what: &'static str,
    },
    /// More items than [`MAX_PORTS_PER_KEY`].
    #[error("more than {MAX_PORTS_PER_KEY} ports")]
    TooMany,
}

/// How the bytes of a port's connections look to the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// Plain HTTP/1 (the kubelet's read-only port, dnat pairs, `http-proxy-ports`).
    Http,
    /// TLS, passed through (the kubelet's port, `https-proxy-ports`).
    Tls,
    /// Served only because it is in `localhost-proxy-ports`: the bytes are whatever they are.
    Opaque,
}

/// The ports the server serves, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    fixed: FixedPorts,
    /// Node port → front port (always the HTTP front's).
    dnat: BTreeMap<u16, u16>,
    http: PortSet,
    https: PortSet,
    localhost: PortSet,
}

impl PortConfig {
    /// The configuration of an empty ConfigMap: the kubelet's ports, and the default
    /// `localhost-proxy-ports`.
    pub fn new(fixed: FixedPorts) -> Self {
        Self {
            fixed,
            dnat: BTreeMap::new(),
            http: PortSet::default(),
            https: PortSet::default(),
            localhost: PortSet::new(DEFAULT_LOCALHOST_PROXY_PORTS),
        }
    }

    /// Parses the ConfigMap's `(key, value)` pairs. Keys other than [`KEYS`] are not read (the
    /// caller may warn about them); an absent key takes its default; an empty value is an
    /// empty list.
    pub fn parse<'a>(
        values: impl IntoIterator<Item = (&'a str, &'a str)>,
        fixed: FixedPorts,
    ) -> Result<Self, PortConfigError> {
        let mut config = Self::new(fixed);
        for (key, value) in values {
            match key {
                DNAT_PORTS_PAIR => {
                    config.dnat = parse_pairs(value, fixed.http_front).map_err(|problem| {
                        PortConfigError {
                            key: DNAT_PORTS_PAIR,
                            problem,
                        }
                    })?;
                }
                HTTP_PROXY_PORTS => config.http = list(HTTP_PROXY_PORTS, value)?,
                HTTPS_PROXY_PORTS => config.https = list(HTTPS_PROXY_PORTS, value)?,
                LOCALHOST_PROXY_PORTS => config.localhost = list(LOCALHOST_PROXY_PORTS, value)?,
                _ => {}
            }
        }
        config.check_conflicts()?;
        Ok(config)
    }

    /// A port is plain HTTP or TLS, never both: the TLS ports (the kubelet's, `https-proxy-ports`)
    /// must not appear among the plain HTTP ones.
    fn check_conflicts(&self) -> Result<(), PortConfigError> {
        let conflict = |key, port, other| PortConfigError {
            key,
            problem: PortProblem::Conflict { port, other },
        };
        for port in self.https.iter() {
            if self.dnat.contains_key(&port) {
                return Err(conflict(DNAT_PORTS_PAIR, port, HTTPS_PROXY_PORTS));
            }
            if self.http.contains(port) {
                return Err(conflict(HTTP_PROXY_PORTS, port, HTTPS_PROXY_PORTS));
            }
            if port == self.fixed.kubelet_read_only {
                return Err(conflict(
                    HTTPS_PROXY_PORTS,
                    port,
                    "the kubelet read-only port",
                ));
            }
        }
        let kubelet = self.fixed.kubelet;
        if self.dnat.contains_key(&kubelet) {
            return Err(conflict(DNAT_PORTS_PAIR, kubelet, "the kubelet port"));
        }
        if self.http.contains(kubelet) {
            return Err(conflict(HTTP_PROXY_PORTS, kubelet, "the kubelet port"));
        }
        Ok(())
    }

    /// Whether a client may reach `port` on a node.
    pub fn serves(&self, port: u16) -> bool {
        self.kind(port).is_some()
    }

    /// How `port`'s bytes look, or `None` when it is not served.
    pub fn kind(&self, port: u16) -> Option<PortKind> {
        if port == self.fixed.kubelet || self.https.contains(port) {
            Some(PortKind::Tls)
        } else if port == self.fixed.kubelet_read_only
            || self.http.contains(port)
            || self.dnat.contains_key(&port)
        {
            Some(PortKind::Http)
        } else if self.localhost.contains(port) {
            Some(PortKind::Opaque)
        } else {
            None
        }
    }

    /// The ports served as TLS passthrough on a front port of their own.
    pub fn https_proxy_ports(&self) -> &PortSet {
        &self.https
    }

    /// The ports that do not come from the ConfigMap: the kubelet's and the HTTP front's.
    pub fn fixed(&self) -> FixedPorts {
        self.fixed
    }

    /// The `dnat-ports-pair` entries: node port → front port.
    pub fn dnat_pairs(&self) -> &BTreeMap<u16, u16> {
        &self.dnat
    }

    /// The `http-proxy-ports`.
    pub fn http_proxy_ports(&self) -> &PortSet {
        &self.http
    }

    /// The ports the agent dials on loopback.
    pub fn localhost_proxy_ports(&self) -> &PortSet {
        &self.localhost
    }

    /// The ports served as plain HTTP through the HTTP front (the kubelet's read-only port, the
    /// dnat pairs' node ports, `http-proxy-ports`).
    pub fn http_ports(&self) -> PortSet {
        PortSet::new(
            std::iter::once(self.fixed.kubelet_read_only)
                .chain(self.dnat.keys().copied())
                .chain(self.http.iter()),
        )
    }

    /// Each key with its value in canonical form (sorted, no spaces): what [`parse`](Self::parse)
    /// reads back to this configuration.
    pub fn values(&self) -> [(&'static str, String); 4] {
        let pairs: Vec<String> = self.dnat.iter().map(|(n, t)| format!("{n}={t}")).collect();
        [
            (DNAT_PORTS_PAIR, pairs.join(",")),
            (HTTP_PROXY_PORTS, self.http.to_string()),
            (HTTPS_PROXY_PORTS, self.https.to_string()),
            (LOCALHOST_PROXY_PORTS, self.localhost.to_string()),
        ]
    }

    /// Every port served.
    pub fn served(&self) -> PortSet {
        self.http_ports()
            .union(&self.https)
            .union(&self.localhost)
            .union(&PortSet::new([self.fixed.kubelet]))
    }

    /// What the agents may dial: every served port, on loopback for `localhost-proxy-ports`
    /// and on the node's own IPs for the rest.
    pub fn policy(&self) -> PortPolicy {
        let served = self.served();
        PortPolicy {
            node: PortSet::new(served.iter().filter(|p| !self.localhost.contains(*p))),
            loopback: self.localhost.clone(),
        }
    }
}

impl fmt::Display for PortConfig {
    /// The configuration in the ConfigMap's own keys, for the log line of every change.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in self.values().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{key}={value:?}")?;
        }
        Ok(())
    }
}

/// Which ports of its node an agent may dial, and where: what the server tells its agents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// Ports dialed on the node's own IPs.
    pub node: PortSet,
    /// Ports dialed on the node's loopback instead.
    pub loopback: PortSet,
}

impl fmt::Display for PortPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node ports {:?}, loopback ports {:?}",
            self.node.to_string(),
            self.loopback.to_string()
        )
    }
}

/// The items of a comma-separated value: trimmed, empty ones skipped, at most
/// [`MAX_PORTS_PER_KEY`].
fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|i| !i.is_empty())
}

fn port(item: &str) -> Result<u16, PortProblem> {
    item.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| PortProblem::Port(super::truncate(item)))
}

fn list(key: &'static str, value: &str) -> Result<PortSet, PortConfigError> {
    let err = |problem| PortConfigError { key, problem };
    let mut ports = Vec::new();
    for item in items(value) {
        if ports.len() == MAX_PORTS_PER_KEY {
            return Err(err(PortProblem::TooMany));
        }
        let p = port(item).map_err(err)?;
        if ports.contains(&p) {
            return Err(err(PortProblem::Duplicate(p)));
        }
        ports.push(p);
    }
    Ok(PortSet::new(ports))
}

fn parse_pairs(value: &str, front: u16) -> Result<BTreeMap<u16, u16>, PortProblem> {
    let mut pairs = BTreeMap::new();
    for item in items(value) {
        if pairs.len() == MAX_PORTS_PER_KEY {
            return Err(PortProblem::TooMany);
        }
        let Some((node, target)) = item.split_once('=') else {
            return Err(PortProblem::Pair(super::truncate(item)));
        };
        let (node, target) = (port(node.trim())?, port(target.trim())?);
        if target != front {
            return Err(PortProblem::PairTarget {
                item: super::truncate(item),
                target,
                front,
            });
        }
        if pairs.insert(node, target).is_some() {
            return Err(PortProblem::Duplicate(node));
        }
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(values: &[(&str, &str)]) -> Result<PortConfig, PortConfigError> {
        PortConfig::parse(values.iter().copied(), FixedPorts::default())
    }

    #[test]
    fn the_keys_as_operators_write_them() {
        let config = parse(&[
            (DNAT_PORTS_PAIR, "9051=10264,9052=10264"),
            (HTTP_PROXY_PORTS, "9051"),
            (HTTPS_PROXY_PORTS, "9053, 8080"),
            (LOCALHOST_PROXY_PORTS, " 10250, 10255 ,10266, 10267, 8080 "),
        ])
        .unwrap();
        assert_eq!(config.kind(10250), Some(PortKind::Tls));
        assert_eq!(config.kind(10255), Some(PortKind::Http));
        assert_eq!(config.kind(9051), Some(PortKind::Http));
        assert_eq!(config.kind(9052), Some(PortKind::Http));
        assert_eq!(config.kind(9053), Some(PortKind::Tls));
        assert_eq!(config.kind(8080), Some(PortKind::Tls));
        assert_eq!(config.kind(10266), Some(PortKind::Opaque));
        assert_eq!(config.kind(9100), None);
        assert_eq!(config.https_proxy_ports().to_string(), "8080,9053");
        let policy = config.policy();
        assert_eq!(policy.node.to_string(), "9051,9052,9053");
        assert_eq!(policy.loopback.to_string(), "8080,10250,10255,10266,10267");
    }

    #[test]
    fn absent_keys_take_their_defaults_and_the_kubelet_is_always_served() {
        let config = parse(&[]).unwrap();
        assert_eq!(config, PortConfig::new(FixedPorts::default()));
        assert!(config.serves(10250) && config.serves(10255) && config.serves(10267));
        assert!(!config.serves(9100));
        // An empty list is a list: the kubelet is then dialed on the node's IP.
        let config = parse(&[(LOCALHOST_PROXY_PORTS, ""), (HTTP_PROXY_PORTS, " ")]).unwrap();
        assert_eq!(config.policy().node.to_string(), "10250,10255");
        assert!(config.policy().loopback.is_empty());
        // Keys it does not know are not its business.
        assert!(parse(&[("other", "x")]).is_ok());
    }

    #[test]
    fn bad_values_name_their_key_and_item() {
        let cases: [(&[(&str, &str)], &str); 12] = [
            (
                &[(HTTP_PROXY_PORTS, "9051, 90x1")],
                "http-proxy-ports: invalid port \"90x1\": a number from 1 to 65535",
            ),
            (
                &[(HTTP_PROXY_PORTS, "0")],
                "http-proxy-ports: invalid port \"0\": a number from 1 to 65535",
            ),
            (
                &[(HTTPS_PROXY_PORTS, "65536")],
                "https-proxy-ports: invalid port \"65536\": a number from 1 to 65535",
            ),
            (
                &[(LOCALHOST_PROXY_PORTS, "-1")],
                "localhost-proxy-ports: invalid port \"-1\": a number from 1 to 65535",
            ),
            (
                &[(HTTP_PROXY_PORTS, "9051, 9051")],
                "http-proxy-ports: port 9051 is listed twice",
            ),
            (
                &[(DNAT_PORTS_PAIR, "9051")],
                "dnat-ports-pair: invalid pair \"9051\": write NODE_PORT=FRONT_PORT, e.g. 9051=10264",
            ),
            (
                &[(DNAT_PORTS_PAIR, "9051=10263")],
                "dnat-ports-pair: pair \"9051=10263\" targets port 10263: a pair must target the HTTP front port 10264",
            ),
            (
                &[(DNAT_PORTS_PAIR, "9051=10264, 9051=10264")],
                "dnat-ports-pair: port 9051 is listed twice",
            ),
            (
                &[(DNAT_PORTS_PAIR, "x=10264")],
                "dnat-ports-pair: invalid port \"x\": a number from 1 to 65535",
            ),
            (
                &[(HTTP_PROXY_PORTS, "9052"), (HTTPS_PROXY_PORTS, "9052")],
                "http-proxy-ports: port 9052 is also in https-proxy-ports: a port is served either as plain HTTP or as TLS, not both",
            ),
            (
                &[(HTTP_PROXY_PORTS, "10250")],
                "http-proxy-ports: port 10250 is also in the kubelet port: a port is served either as plain HTTP or as TLS, not both",
            ),
            (
                &[(HTTPS_PROXY_PORTS, "10255")],
                "https-proxy-ports: port 10255 is also in the kubelet read-only port: a port is served either as plain HTTP or as TLS, not both",
            ),
        ];
        for (values, want) in cases {
            assert_eq!(parse(values).unwrap_err().to_string(), want, "{values:?}");
        }
        let many: String = (1..=MAX_PORTS_PER_KEY + 1)
            .map(|p| format!("{p},"))
            .collect();
        assert_eq!(
            parse(&[(HTTP_PROXY_PORTS, &many)]).unwrap_err().problem,
            PortProblem::TooMany
        );
    }

    #[test]
    fn dnat_pairs_follow_the_http_front_port() {
        let fixed = FixedPorts {
            http_front: 20264,
            ..FixedPorts::default()
        };
        let config = PortConfig::parse([(DNAT_PORTS_PAIR, "9051 = 20264")], fixed).unwrap();
        assert_eq!(config.kind(9051), Some(PortKind::Http));
        assert!(PortConfig::parse([(DNAT_PORTS_PAIR, "9051=10264")], fixed).is_err());
    }

    #[test]
    fn display_names_every_key() {
        let config =
            parse(&[(DNAT_PORTS_PAIR, "9051=10264"), (HTTPS_PROXY_PORTS, "9053")]).unwrap();
        assert_eq!(
            config.to_string(),
            "dnat-ports-pair=\"9051=10264\" http-proxy-ports=\"\" https-proxy-ports=\"9053\" localhost-proxy-ports=\"10250,10255,10266,10267\""
        );
    }
}
