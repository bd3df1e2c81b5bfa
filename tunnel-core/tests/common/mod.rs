//! What the tunnel-core integration tests share: an in-memory PKI (a CA, a server
//! certificate for `localhost`, an agent certificate for `node-a`).
#![allow(dead_code, unreachable_pub)]

use tunnel_core::tls;

pub struct Pki {
    pub ca: String,
    pub server: tls::Identity,
    pub agent: tls::Identity,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let issue = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
        p.distinguished_name = DistinguishedName::new();
        let cert = p.signed_by(&key, &issuer).unwrap();
        tls::Identity::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    };
    Pki {
        server: issue("localhost"),
        agent: issue("node-a"),
        ca: ca_pem,
    }
}

impl Pki {
    pub fn roots(&self) -> rustls::RootCertStore {
        tls::roots_from_pem(self.ca.as_bytes(), "ca").unwrap()
    }
}

/// A listener on loopback with `config`, and a connector over `choice` whose agent
/// certificate (node-a) it accepts.
pub async fn endpoints(
    config: tunnel_core::ListenerConfig,
    choice: tunnel_core::TransportChoice,
) -> (tunnel_core::Listener, tunnel_core::Connector) {
    let pki = pki();
    let server_tls = tls::server_config(pki.server.clone(), pki.roots(), &[]).unwrap();
    let listener = tunnel_core::Listener::bind("127.0.0.1:0".parse().unwrap(), server_tls, config)
        .await
        .unwrap();
    let client_tls = tls::client_config(pki.agent.clone(), pki.roots(), &[]).unwrap();
    let connector =
        tunnel_core::Connector::new(client_tls, tunnel_core::SessionConfig::default(), choice)
            .unwrap();
    (listener, connector)
}
