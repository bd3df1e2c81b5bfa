//! The agent's identity: certificate and key from files, checked against the flags, turned into
//! the rustls client configuration of the tunnel.

use std::net::IpAddr;
use std::path::Path;

use tracing::warn;
use tunnel_core::tls::{self, AgentIdentity};

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

async fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| ConfigError::Read {
            flag,
            path: path.to_owned(),
            source,
        })
}

/// Loads the files named by `config`.
pub async fn load(config: &AgentConfig) -> Result<LoadedIdentity, ConfigError> {
    let (Some(cert), Some(key), Some(ca)) = (
        &config.tls_cert_file,
        &config.tls_private_key_file,
        &config.ca_file,
    ) else {
        config.validate()?;
        return Err(ConfigError::Missing {
            flag: "--tls-cert-file",
        });
    };
    let tls_err = |flag| move |source| ConfigError::Tls { flag, source };
    let id = tunnel_core::Identity::from_pem(
        &read("--tls-cert-file", cert).await?,
        &read("--tls-private-key-file", key).await?,
    )
    .map_err(tls_err("--tls-cert-file/--tls-private-key-file"))?;
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
    let roots = tls::roots_from_pem(&read("--ca-file", ca).await?, "CA file")
        .map_err(tls_err("--ca-file"))?;
    let client =
        tls::client_config(id, roots, &[tls::ALPN_QUIC]).map_err(tls_err("--tls-cert-file"))?;
    Ok(LoadedIdentity {
        client,
        identity,
        dial_ips,
    })
}
