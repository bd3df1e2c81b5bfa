//! Agent configuration: what the flags set, validated before anything dials.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tunnel_core::copy::CopyConfig;
use tunnel_core::{PortSet, SessionConfig};
pub use tunnel_process::ConfigError;

/// Reconnect delays: exponential with jitter, capped.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// First delay. Default 1 s.
    pub initial: Duration,
    /// Growth per failed attempt. Default 1.6.
    pub factor: f64,
    /// Random spread around each delay, as a fraction. Default 0.2 (±20 %).
    pub jitter: f64,
    /// Largest delay. Default 30 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            factor: 1.6,
            jitter: 0.2,
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before attempt `failures + 1`, with `unit` (in 0..1) choosing the jitter.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let base = self.initial.as_secs_f64()
            * self
                .factor
                .powi(i32::try_from(failures).unwrap_or(i32::MAX));
        let capped = base.min(self.max.as_secs_f64());
        let spread = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((capped * spread).max(0.0))
    }
}

/// Everything [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The server, `HOST:PORT`; every address HOST resolves to is tried.
    pub server_address: String,
    /// Name to verify in the server's certificate. Default: HOST of `server_address`.
    pub server_name: Option<String>,
    /// This node's name, as claimed at registration. The server uses the certificate's.
    pub node_name: String,
    /// This node's IPs, for dialing: each must be an IP SAN of the certificate. Empty: all of
    /// the certificate's IP SANs.
    pub node_ips: Vec<IpAddr>,
    /// Agent certificate (PEM): the node name in a DNS SAN or CN, node IPs as IP SANs.
    pub tls_cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_private_key_file: Option<PathBuf>,
    /// CA bundle (PEM) the server's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// Address of the meta server. Default 127.0.0.1.
    pub meta_bind_address: IpAddr,
    /// Port of the meta server; 0 turns it off. Default 10266.
    pub meta_port: u16,
    /// Ports the agent may dial on the node's own IPs: narrows the server's port policy.
    /// `None`: the policy decides (10250, 10255 when the server sends none).
    pub allowed_ports: Option<PortSet>,
    /// Ports the agent may dial on 127.0.0.1 instead: narrows the server's policy. `None`:
    /// the policy decides (10250, 10255, 10266, 10267 when the server sends none).
    pub localhost_proxy_ports: Option<PortSet>,
    /// Time for a local dial. Shorter than the server's open timeout. Default 5 s.
    pub dial_timeout: Duration,
    /// Link settings (must match the server's view of windows and pings).
    pub session: SessionConfig,
    /// Copy loop settings.
    pub copy: CopyConfig,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// On shutdown, how long open streams may finish. Default 10 s.
    pub drain_timeout: Duration,
    /// Renders `/metrics`; `None` serves 404 there.
    pub metrics: Option<PrometheusHandle>,
    /// Which transport to use. Default auto (QUIC, else gRPC).
    pub transport: tunnel_core::TransportChoice,
    /// Sessions kept at once, each to a distinct replica (server id) reached through
    /// `server_address`: with 2, losing a replica leaves the node served by the other without
    /// waiting for a reconnect. Default 1; at most 8.
    pub server_redundancy: usize,
    /// With `auto` running over gRPC: how often to try QUIC again. A QUIC session that comes
    /// up takes over; the gRPC one finishes its open streams first. Default 5 min.
    pub quic_retry_interval: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            server_address: String::new(),
            server_name: None,
            node_name: String::new(),
            node_ips: Vec::new(),
            tls_cert_file: None,
            tls_private_key_file: None,
            ca_file: None,
            meta_bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            meta_port: 10266,
            allowed_ports: None,
            localhost_proxy_ports: None,
            dial_timeout: Duration::from_secs(5),
            session: SessionConfig::default(),
            copy: CopyConfig::default(),
            backoff: Backoff::default(),
            drain_timeout: Duration::from_secs(10),
            metrics: None,
            transport: tunnel_core::TransportChoice::default(),
            server_redundancy: 1,
            quic_retry_interval: Duration::from_secs(300),
        }
    }
}

impl AgentConfig {
    /// Checks what can be checked without touching files or the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server_address.is_empty() {
            return Err(ConfigError::Missing {
                flag: "--server-address",
            });
        }
        crate::connector::split_host_port(&self.server_address)?;
        for (flag, value) in [
            ("--tls-cert-file", &self.tls_cert_file),
            ("--tls-private-key-file", &self.tls_private_key_file),
            ("--ca-file", &self.ca_file),
        ] {
            if value.is_none() {
                return Err(ConfigError::Missing { flag });
            }
        }
        if self.dial_timeout >= self.session.open_timeout {
            return Err(ConfigError::Invalid {
                what: "dial timeout",
                why: format!(
                    "{:?} must be shorter than the server's open timeout {:?}",
                    self.dial_timeout, self.session.open_timeout
                ),
            });
        }
        if !(1..=MAX_REDUNDANCY).contains(&self.server_redundancy) {
            return Err(ConfigError::Invalid {
                what: "--server-redundancy",
                why: format!("must be 1 to {MAX_REDUNDANCY}"),
            });
        }
        if self.quic_retry_interval.is_zero() {
            return Err(ConfigError::Invalid {
                what: "--quic-retry-interval-seconds",
                why: "must be at least 1 s".into(),
            });
        }
        Ok(())
    }
}

/// The most sessions an agent keeps to distinct replicas.
pub const MAX_REDUNDANCY: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_factor_with_bounded_jitter_and_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay(1, 0.5), Duration::from_secs_f64(1.6));
        assert_eq!(b.delay(0, 0.0), Duration::from_secs_f64(0.8));
        assert_eq!(b.delay(0, 1.0), Duration::from_secs_f64(1.2));
        assert_eq!(b.delay(50, 0.5), Duration::from_secs(30));
        assert!(b.delay(50, 1.0) <= Duration::from_secs(36));
    }
}
