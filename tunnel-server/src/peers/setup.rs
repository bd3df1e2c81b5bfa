//! The peering wiring of a server: checked and prepared before the tunnel listener binds (it
//! needs the queue peer links go to), started with the rest.

use std::sync::Arc;

use hickory_resolver::TokioResolver;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tunnel_core::{Connector, ReplicaSession, TransportChoice};
use tunnel_process::files::TlsFiles;

use super::{Dialing, Membership, Peers, Serving, dial};
use crate::config::{ConfigError, ServerConfig};
use crate::ports::Ports;
use crate::registry::Registry;

/// Peer links accepted but not yet taken by [`Peers::accept`]; a replica whose link finds it
/// full dials again.
const ACCEPT_QUEUE: usize = 64;

/// Peering, ready to start: `None` inside when no peer is configured.
#[derive(Debug)]
pub(crate) struct Setup(Option<Prepared>);

#[derive(Debug)]
struct Prepared {
    links: mpsc::Receiver<ReplicaSession>,
    membership: Membership,
    resolver: TokioResolver,
    server_name: String,
    connector: Connector,
}

impl Setup {
    /// Checks that the serving certificate can be a replica's identity and makes the client
    /// side of the peer links from it. Returns the sender the tunnel listener hands peer links
    /// to, when there are peers.
    pub(crate) fn prepare(
        config: &ServerConfig,
        files: &TlsFiles,
        tunnel_port: u16,
    ) -> Result<(Self, Option<mpsc::Sender<ReplicaSession>>), ConfigError> {
        if !config.peers.is_set() {
            return Ok((Self(None), None));
        }
        let invalid = |why: String| ConfigError::Invalid {
            what: "--tls-cert-file (as a replica's identity for --peers / --peer-dns-name)",
            why,
        };
        let identity = files.identity()?;
        let leaf = identity
            .chain
            .first()
            .ok_or_else(|| invalid("no certificate".into()))?;
        if !tunnel_core::tls::is_replica_certificate(leaf).map_err(|e| invalid(e.to_string()))? {
            return Err(invalid(format!(
                "it lacks the replica mark (URI SAN {}, with client authentication): make it with `tunnel-server pki init`, or add both",
                tunnel_core::tls::REPLICA_URI
            )));
        }
        let server_name = tunnel_core::tls::dns_names(leaf)
            .map_err(|e| invalid(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| invalid("it has no DNS name to verify the peers by".into()))?;
        // The peers present the same kind of certificate, issued by the CA this replica
        // verifies agents with, and must carry the replica mark.
        let tls = tunnel_core::tls::replica_client_config(
            identity,
            files.roots()?,
            &[tunnel_core::tls::ALPN_QUIC],
        )
        .map_err(|source| ConfigError::Tls {
            flag: "--tls-cert-file",
            source,
        })?;
        let session = config.session.for_peer_links();
        let connector = Connector::new(tls, session, TransportChoice::Quic)
            .map_err(|e| invalid(e.to_string()))?;
        let resolver = resolver(config.peers.dns_server)?;
        let membership = Membership {
            statics: config.peers.statics()?,
            dns_name: config
                .peers
                .dns_name
                .clone()
                .map(|name| (name, tunnel_port)),
        };
        let (tx, links) = mpsc::channel(ACCEPT_QUEUE);
        let prepared = Prepared {
            links,
            membership,
            resolver,
            server_name,
            connector,
        };
        Ok((Self(Some(prepared)), Some(tx)))
    }

    /// Starts taking and dialing peer links; returns the peers the fronts forward through.
    pub(crate) fn start(
        self,
        tasks: &mut JoinSet<()>,
        config: &ServerConfig,
        registry: &Arc<Registry>,
        ports: &Arc<Ports>,
        stop: &watch::Receiver<bool>,
    ) -> Option<Arc<Peers>> {
        let prepared = self.0?;
        let serving = Arc::new(Serving::default());
        let peers = Arc::new(Peers::new(&config.server_id, serving.clone()));
        let accepting = peers.clone();
        tasks.spawn(async move { accepting.accept(prepared.links).await });
        let dialing = Dialing {
            server_id: config.server_id.clone(),
            server_name: prepared.server_name,
            connector: prepared.connector,
            registry: registry.clone(),
            ports: ports.clone(),
            copy: config.copy.clone(),
            linked: std::sync::Mutex::default(),
            serving,
        };
        tasks.spawn(dial(
            prepared.membership,
            prepared.resolver,
            dialing,
            stop.clone(),
        ));
        Some(peers)
    }
}

/// A resolver asking `server`, or the nameservers of `/etc/resolv.conf`. No cache: the peer
/// list is resolved every few seconds to see replicas come and go.
fn resolver(server: Option<std::net::SocketAddr>) -> Result<TokioResolver, ConfigError> {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    let invalid = |why: String| ConfigError::Invalid {
        what: "resolver for --peer-dns-name (--peer-dns-server, or /etc/resolv.conf)",
        why,
    };
    let mut builder = match server {
        Some(addr) => {
            let mut name_server = NameServerConfig::udp_and_tcp(addr.ip());
            for connection in &mut name_server.connections {
                connection.port = addr.port();
            }
            let config = ResolverConfig::from_name_servers(vec![name_server]);
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        }
        None => TokioResolver::builder_tokio().map_err(|e| invalid(e.to_string()))?,
    };
    builder.options_mut().cache_size = 0;
    builder.build().map_err(|e| invalid(e.to_string()))
}
