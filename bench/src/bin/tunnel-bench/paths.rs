//! The ways a client reaches a target: directly (the ceiling), through edge-tunnel over QUIC or
//! gRPC (CONNECT on the server's HTTP front, one stream to the node's agent), or through
//! rathole with TLS (the users' alternative for a plain reverse tunnel).

use std::collections::HashMap;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpStream;

/// One way from the client to the targets.
#[derive(Debug, Clone)]
pub(crate) enum Path {
    Direct,
    /// CONNECT `node:port` on the HTTP front.
    Tunnel {
        front: SocketAddr,
        node: String,
    },
    /// rathole: each target port has its own service port on the rathole server.
    Rathole {
        services: HashMap<u16, SocketAddr>,
    },
}

impl Path {
    /// A connection to `target` along this path, Nagle off as the tunnel's own sockets are.
    pub(crate) async fn connect(&self, target: SocketAddr) -> anyhow::Result<TcpStream> {
        let tcp = match self {
            Self::Direct => TcpStream::connect(target).await?,
            Self::Tunnel { front, node } => {
                testkit::client::connect_via(*front, &format!("{node}:{}", target.port())).await?
            }
            Self::Rathole { services } => {
                let addr = services
                    .get(&target.port())
                    .context("no rathole service for this target")?;
                TcpStream::connect(addr).await?
            }
        };
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }
}

/// The columns of the report, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub(crate) enum Column {
    Direct,
    Quic,
    Grpc,
    #[value(name = "rathole")]
    Rathole,
}

impl Column {
    pub(crate) const ALL: [Self; 4] = [Self::Direct, Self::Quic, Self::Grpc, Self::Rathole];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Quic => "quic",
            Self::Grpc => "grpc",
            Self::Rathole => "rathole_tls",
        }
    }
}
