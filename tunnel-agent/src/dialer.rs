//! Reaching the server: resolve its name (hickory; every address tried), connect, register.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use tokio::task::JoinSet;
use tracing::debug;
use tunnel_core::{AgentSession, QuicConnector, SessionError, proto};

use crate::config::ConfigError;

/// Splits `HOST:PORT` (IPv6 in brackets).
pub fn split_host_port(addr: &str) -> Result<(String, u16), ConfigError> {
    let invalid = |why: &str| ConfigError::Invalid {
        what: "--server-address",
        why: format!("{addr:?}: {why}"),
    };
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected HOST:PORT"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(invalid("empty host"));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid("bad port"))?;
    Ok((host.to_owned(), port))
}

/// Why no session came up.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The name did not resolve.
    #[error("resolving {host}: {message}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's message.
        message: String,
    },
    /// Every address failed; the last error is kept.
    #[error("{addr}: {source}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// Its failure.
        #[source]
        source: SessionError,
    },
}

impl DialError {
    /// True when retrying cannot help without operator action (the server rejects our identity
    /// or protocol).
    pub fn is_peer(&self) -> bool {
        matches!(self, Self::Connect { source, .. } if source.is_peer())
    }
}

/// Resolves the server and connects to the first address that works.
#[derive(Debug)]
pub struct ServerDialer {
    host: String,
    port: u16,
    server_name: String,
    resolver: Option<TokioResolver>,
    connector: Connectors,
}

/// Which transport the agent uses to reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// QUIC first; gRPC over TLS/TCP when no QUIC session is up within [`QUIC_FIRST`].
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// gRPC only (networks that block UDP).
    Grpc,
}

impl std::str::FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Quic),
            "grpc" => Ok(Self::Grpc),
            other => Err(format!("unknown transport {other:?} (auto, quic, grpc)")),
        }
    }
}

/// How long `auto` gives QUIC before it tries gRPC on the same address.
pub const QUIC_FIRST: std::time::Duration = std::time::Duration::from_secs(3);

/// The connectors of both transports and the choice between them.
#[derive(Debug, Clone)]
pub struct Connectors {
    /// QUIC.
    pub quic: QuicConnector,
    /// gRPC.
    pub grpc: tunnel_core::GrpcConnector,
    /// Which to use.
    pub choice: TransportChoice,
}

impl Connectors {
    async fn connect(
        &self,
        choice: TransportChoice,
        addr: SocketAddr,
        name: &str,
        register: proto::Register,
    ) -> Result<AgentSession, SessionError> {
        match choice {
            TransportChoice::Quic => self.quic.connect(addr, name, register).await,
            TransportChoice::Grpc => self.grpc.connect(addr, name, register).await,
            TransportChoice::Auto => {
                match tokio::time::timeout(
                    QUIC_FIRST,
                    self.quic.connect(addr, name, register.clone()),
                )
                .await
                {
                    Ok(Ok(session)) => Ok(session),
                    Ok(Err(e)) => {
                        debug!(%addr, error = %e, "QUIC failed; trying gRPC");
                        self.grpc.connect(addr, name, register).await
                    }
                    Err(_) => {
                        debug!(%addr, "no QUIC session within {QUIC_FIRST:?}; trying gRPC");
                        self.grpc.connect(addr, name, register).await
                    }
                }
            }
        }
    }
}

impl ServerDialer {
    /// A dialer for `address` (`HOST:PORT`), verifying the server as `server_name` (default
    /// HOST).
    pub fn new(
        address: &str,
        server_name: Option<&str>,
        connector: Connectors,
    ) -> Result<Self, ConfigError> {
        let (host, port) = split_host_port(address)?;
        let resolver = if host.parse::<IpAddr>().is_ok() {
            None
        } else {
            Some(
                TokioResolver::builder_tokio()
                    .map_err(|e| ConfigError::Invalid {
                        what: "resolver configuration (/etc/resolv.conf)",
                        why: e.to_string(),
                    })?
                    .build()
                    .map_err(|e| ConfigError::Invalid {
                        what: "resolver",
                        why: e.to_string(),
                    })?,
            )
        };
        Ok(Self {
            server_name: server_name.map_or_else(|| host.clone(), str::to_owned),
            host,
            port,
            resolver,
            connector,
        })
    }

    /// Every address of the server, in resolver order.
    pub async fn addresses(&self) -> Result<Vec<SocketAddr>, DialError> {
        let Some(resolver) = &self.resolver else {
            let ip: IpAddr = self.host.parse().map_err(|_| DialError::Resolve {
                host: self.host.clone(),
                message: "not an IP".into(),
            })?;
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        };
        let lookup =
            resolver
                .lookup_ip(self.host.as_str())
                .await
                .map_err(|e| DialError::Resolve {
                    host: self.host.clone(),
                    message: e.to_string(),
                })?;
        Ok(lookup
            .iter()
            .map(|ip| SocketAddr::new(ip, self.port))
            .collect())
    }

    /// Connects to the first address that completes the handshake and registration. Addresses
    /// are tried in resolver order, each started [`ATTEMPT_STAGGER`] after the previous one
    /// (or at once when it fails), as in Happy Eyeballs (RFC 8305): an address that swallows
    /// packets (an IPv6 path that does not work, say) costs a quarter second, not a handshake
    /// timeout.
    pub async fn connect(&self, register: &proto::Register) -> Result<AgentSession, DialError> {
        self.connect_over(self.connector.choice, register).await
    }

    /// The transport choice the dialer was made with.
    pub fn choice(&self) -> TransportChoice {
        self.connector.choice
    }

    /// As [`connect`](Self::connect), over `choice` rather than the configured choice (`auto`
    /// tries QUIC again this way while it runs over gRPC).
    pub async fn connect_over(
        &self,
        choice: TransportChoice,
        register: &proto::Register,
    ) -> Result<AgentSession, DialError> {
        let mut pending = self.addresses().await?.into_iter();
        let mut attempts = JoinSet::new();
        let mut last = None;
        loop {
            if let Some(addr) = pending.next() {
                let connector = self.connector.clone();
                let name = self.server_name.clone();
                let register = register.clone();
                attempts.spawn(async move {
                    (addr, connector.connect(choice, addr, &name, register).await)
                });
            }
            if attempts.is_empty() {
                break;
            }
            let more = pending.len() > 0;
            tokio::select! {
                done = attempts.join_next() => match done {
                    Some(Ok((_, Ok(session)))) => return Ok(session),
                    Some(Ok((addr, Err(source)))) => {
                        debug!(%addr, error = %source, "server address failed");
                        last = Some(DialError::Connect { addr, source });
                    }
                    // A panicked attempt counts as a failed one.
                    Some(Err(_)) | None => {}
                },
                () = tokio::time::sleep(ATTEMPT_STAGGER), if more => {}
            }
        }
        Err(last.unwrap_or_else(|| DialError::Resolve {
            host: self.host.clone(),
            message: "no addresses".into(),
        }))
    }
}

/// Delay between starting connection attempts to successive addresses of the server.
pub const ATTEMPT_STAGGER: std::time::Duration = std::time::Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(
            split_host_port("tunnel.example:10262").unwrap(),
            ("tunnel.example".into(), 10262)
        );
        assert_eq!(
            split_host_port("[::1]:10262").unwrap(),
            ("::1".into(), 10262)
        );
        for bad in ["tunnel", ":10262", "tunnel:0", "tunnel:x"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }
}
