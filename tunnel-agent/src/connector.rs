//! Reaching the server: resolve its name (hickory; every address tried), connect over the
//! configured transport, register.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use tokio::task::JoinSet;
use tracing::debug;
use tunnel_core::{AgentSession, Connector, SessionError, proto};

pub use tunnel_core::TransportChoice;

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
pub enum ConnectError {
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
    /// A short attempt, made while recovering a lost link, ran out of time.
    #[error("no session within {0:?} (short attempt while the lost link is recovered)")]
    Attempt(std::time::Duration),
}

impl ConnectError {
    /// Why, as a typed cause and who decided it: a failed resolution is a transport failure
    /// of ours.
    pub fn reason(&self) -> tunnel_core::CloseReason {
        match self {
            Self::Resolve { .. } => {
                tunnel_core::CloseReason::local(tunnel_core::CloseCause::Transport)
            }
            Self::Connect { source, .. } => source.reason(),
            Self::Attempt(_) => {
                tunnel_core::CloseReason::local(tunnel_core::CloseCause::HandshakeTimeout)
            }
        }
    }
}

/// Resolves the server and connects to the first address that works.
#[derive(Debug, Clone)]
pub struct ServerConnector {
    host: String,
    port: u16,
    server_name: String,
    resolver: Option<TokioResolver>,
    connector: Connector,
}

impl ServerConnector {
    /// A connector for `address` (`HOST:PORT`), verifying the server as `server_name` (default
    /// HOST).
    pub fn new(
        address: &str,
        server_name: Option<&str>,
        connector: Connector,
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
    pub async fn addresses(&self) -> Result<Vec<SocketAddr>, ConnectError> {
        let Some(resolver) = &self.resolver else {
            let ip: IpAddr = self.host.parse().map_err(|_| ConnectError::Resolve {
                host: self.host.clone(),
                message: "not an IP".into(),
            })?;
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        };
        let lookup =
            resolver
                .lookup_ip(self.host.as_str())
                .await
                .map_err(|e| ConnectError::Resolve {
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
    pub async fn connect(&self, register: &proto::Register) -> Result<AgentSession, ConnectError> {
        self.connect_over(self.connector.choice(), register).await
    }

    /// The transport choice the connector was made with.
    pub fn choice(&self) -> TransportChoice {
        self.connector.choice()
    }

    /// As [`connect`](Self::connect), over `choice` rather than the configured choice (`auto`
    /// tries QUIC again this way while it runs over gRPC).
    pub async fn connect_over(
        &self,
        choice: TransportChoice,
        register: &proto::Register,
    ) -> Result<AgentSession, ConnectError> {
        let mut pending = self.addresses().await?.into_iter();
        let mut attempts = JoinSet::new();
        let mut last = None;
        loop {
            if let Some(addr) = pending.next() {
                let connector = self.connector.clone();
                let name = self.server_name.clone();
                let register = register.clone();
                attempts.spawn(async move {
                    (
                        addr,
                        connector.connect_over(choice, addr, &name, register).await,
                    )
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
                        last = Some(ConnectError::Connect { addr, source });
                    }
                    // A panicked attempt counts as a failed one.
                    Some(Err(_)) | None => {}
                },
                () = tokio::time::sleep(ATTEMPT_STAGGER), if more => {}
            }
        }
        Err(last.unwrap_or_else(|| ConnectError::Resolve {
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
