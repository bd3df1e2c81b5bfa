//! Embedding tunnel-core: expose a service that runs behind NAT through a public endpoint.
//! The tunnel itself is a [`Listener`] on the public side and a [`Connector`] on the edge side,
//! the same for QUIC and gRPC (chosen by configuration); the rest is what each side does with
//! the streams. Both ends run in this process on loopback, once per transport; in real use the
//! edge half runs on the NATed machine and connects out.
//!
//! ```text
//! cargo run --example embed
//! ```

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tunnel_core::copy::{CopyConfig, copy_bidirectional};
use tunnel_core::{
    AgentSession, Connector, Listener, ListenerConfig, OpenRequest, Refusal, ServerSession,
    SessionConfig, Target, TargetHost, TransportChoice, proto, tls,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pki = tempfile_pki()?;
    // Edge side: a private service nobody can dial from outside.
    let service = TcpListener::bind("127.0.0.1:0").await?;
    let service_port = service.local_addr()?.port();
    let mut tasks = JoinSet::new();
    tasks.spawn(async move {
        while let Ok((mut tcp, _)) = service.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    // Public side: one listener for agents, QUIC on UDP and gRPC on TCP at one port.
    let server_tls = tls::server_config(pki.server.clone(), pki.roots()?, &[])?;
    let mut tunnel = Listener::bind(
        "127.0.0.1:0".parse()?,
        server_tls,
        ListenerConfig::default(),
    )
    .await?;
    let tunnel_addr = tunnel.local_addr();

    for choice in [TransportChoice::Quic, TransportChoice::Grpc] {
        // Edge side: connect out, then serve what the public side opens, on one port only.
        let client_tls = tls::client_config(pki.agent.clone(), pki.roots()?, &[])?;
        let connector = Connector::new(client_tls, SessionConfig::default(), choice)?;
        let register = proto::Register::default();
        // The listener completes handshakes while it is asked for agents: both at once.
        let (edge, session) = tokio::join!(
            connector.connect(tunnel_addr, "localhost", register),
            tunnel.accept()
        );
        tasks.spawn(serve_edge(edge?, service_port));
        let session = session.context("listener closed")??;
        println!(
            "agent {} connected over {} from {}",
            session.identity().node_name,
            session.transport(),
            session.remote_addr()
        );
        expose(session, service_port).await?;
    }
    tasks.shutdown().await;
    Ok(())
}

/// The edge: each stream the public side opens is dialed on loopback, if it names the
/// service's port; anything else is refused, with nothing dialed.
async fn serve_edge(session: AgentSession, service_port: u16) {
    let mut streams = JoinSet::new();
    while let Ok(incoming) = session.accept().await {
        streams.spawn(async move {
            let Ok(requested) = incoming.read_request().await else {
                return;
            };
            if requested.request().target.port != service_port {
                let _ = requested
                    .refuse(Refusal::Forbidden, "only the service port")
                    .await;
                return;
            }
            let Ok(mut local) = TcpStream::connect(("127.0.0.1", service_port)).await else {
                let _ = requested.refuse(Refusal::Refused, "service down").await;
                return;
            };
            if let Ok(mut stream) = requested.accept().await {
                let _ = copy_bidirectional(&mut stream, &mut local, &CopyConfig::default()).await;
            }
        });
    }
}

/// The public side: a TCP port whose connections go through the tunnel to the service; one
/// client shows it.
async fn expose(session: ServerSession, service_port: u16) -> anyhow::Result<()> {
    let public = TcpListener::bind("127.0.0.1:0").await?;
    let public_addr = public.local_addr()?;
    let target = Target {
        host: TargetHost::Loopback,
        port: service_port,
    };
    let forward = tokio::spawn(async move {
        let (mut client, _) = public.accept().await?;
        let request = OpenRequest::new(target, session.next_trace_id());
        let mut stream = session.open(&request).await?;
        copy_bidirectional(&mut client, &mut stream, &CopyConfig::default()).await?;
        anyhow::Ok(())
    });

    let mut client = TcpStream::connect(public_addr).await?;
    client.write_all(b"hello from the internet").await?;
    client.shutdown().await?;
    let mut reply = String::new();
    client.read_to_string(&mut reply).await?;
    anyhow::ensure!(
        reply == "hello from the internet",
        "unexpected reply {reply:?}"
    );
    forward.await??;
    println!("{public_addr} -> tunnel -> 127.0.0.1:{service_port}: echoed {reply:?}");
    Ok(())
}

/// A CA, a server certificate for `localhost` and an agent certificate, in memory.
struct Pki {
    ca_pem: String,
    server: tls::Identity,
    agent: tls::Identity,
}

impl Pki {
    fn roots(&self) -> anyhow::Result<rustls::RootCertStore> {
        Ok(tls::roots_from_pem(self.ca_pem.as_bytes(), "ca")?)
    }
}

fn tempfile_pki() -> anyhow::Result<Pki> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);
    let issue = |name: &str| -> anyhow::Result<tls::Identity> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        // The name is the DNS SAN alone: a different CN would make the identity ambiguous.
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.signed_by(&key, &issuer)?;
        Ok(tls::Identity::from_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
        )?)
    };
    Ok(Pki {
        server: issue("localhost")?,
        agent: issue("edge-box")?,
        ca_pem,
    })
}
