//! The agent's identity: certificate and key from files, checked against the flags, turned into
//! the rustls client configuration of the tunnel.

use std::net::IpAddr;

use tracing::warn;
use tunnel_core::tls::{self, AgentIdentity};
use tunnel_process::files::{TlsFiles, TlsPaths};

use crate::config::{AgentConfig, ConfigError};

/// What the agent proves and may dial.
#[derive(Debug)]
pub struct LoadedIdentity {
    /// The rustls client configuration (client certificate, server roots).
    pub client: rustls::ClientConfig,
    /// Who the certificate says we are.
    pub identity: AgentIdentity,
    /// The IPs the agent dials for its node: the `--node-ip` flags, each checked against the
    /// certificate, or all of the certificate's IP SANs.
    pub dial_ips: Vec<IpAddr>,
}

/// Loads the files named by `config`, each read once.
pub async fn load(config: &AgentConfig) -> Result<LoadedIdentity, ConfigError> {
    let files = TlsFiles::load(TlsPaths {
        cert: config.tls_cert_file.as_deref(),
        key: config.tls_private_key_file.as_deref(),
        ca: config.ca_file.as_deref(),
        ca_flag: "--ca-file",
    })
    .await?;
    let id = files.identity()?;
    let leaf = id.chain.first().ok_or(ConfigError::Missing {
        flag: "--tls-cert-file",
    })?;
    let identity = AgentIdentity::from_certificate(leaf)?;
    // Say it plainly at start rather than as a handshake failure on every reconnect.
    let validity = tls::Validity::of(leaf)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if !validity.contains(now) {
        return Err(ConfigError::Invalid {
            what: "--tls-cert-file",
            why: format!(
                "the certificate is valid from {} to {} (Unix seconds), not now ({now}); renew it",
                validity.not_before, validity.not_after
            ),
        });
    }
    if !config.node_name.is_empty() && config.node_name.to_ascii_lowercase() != identity.node_name {
        warn!(
            node.flag = %config.node_name,
            node.certificate = %identity.node_name,
            "--node-name differs from the certificate; the server registers the certificate's name"
        );
    }
    let dial_ips = if config.node_ips.is_empty() {
        identity.node_ips.clone()
    } else {
        if let Some(ip) = config
            .node_ips
            .iter()
            .find(|ip| !identity.node_ips.contains(ip))
        {
            return Err(ConfigError::Invalid {
                what: "--node-ip",
                why: format!(
                    "{ip} is not an IP SAN of the certificate ({:?}); the agent dials only its own node",
                    identity.node_ips
                ),
            });
        }
        config.node_ips.clone()
    };
    let client = tls::client_config(id, files.roots()?, &[tls::ALPN_QUIC]).map_err(|source| {
        ConfigError::Tls {
            flag: "--tls-cert-file",
            source,
        }
    })?;
    Ok(LoadedIdentity {
        client,
        identity,
        dial_ips,
    })
}
