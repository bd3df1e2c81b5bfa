//! rustls configuration builders (ring only, never a process-wide provider) and the node identity
//! carried by an agent's certificate.

use std::net::IpAddr;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::ConfigError;
use crate::route::{NodeRef, parse_host};

/// ALPN protocol id of the QUIC tunnel.
pub const ALPN_QUIC: &[u8] = b"edge-tunnel/1";

/// The crypto provider every config of this crate uses: ring, passed explicitly so that an
/// embedding program's own process default is neither needed nor changed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Parses a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, ConfigError> {
        Ok(Self {
            chain: certs_from_pem(cert_pem, "certificate file")?,
            key: PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
                rustls_pki_types::pem::Error::NoItemsFound => ConfigError::NoKey("key file"),
                source => ConfigError::Pem {
                    what: "key file",
                    source,
                },
            })?,
        })
    }
}

/// All certificates in a PEM bundle; an empty bundle is an error.
pub fn certs_from_pem(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ConfigError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(ConfigError::NoCertificate(what));
    }
    Ok(certs)
}

/// A root store holding every certificate of a PEM CA bundle.
pub fn roots_from_pem(pem: &[u8], what: &'static str) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem, what)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Server side of the tunnel: TLS 1.3, client certificate required and verified against
/// `client_roots`, ALPN `alpn`.
pub fn server_config(
    identity: Identity,
    client_roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<ServerConfig, ConfigError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), provider.clone())
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Agent side of the tunnel: TLS 1.3, server verified against `server_roots`, client certificate
/// presented.
pub fn client_config(
    identity: Identity,
    server_roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<ClientConfig, ConfigError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(server_roots)
        .with_client_auth_cert(identity.chain, identity.key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A replica's side of its peer links: TLS 1.3, its serving certificate presented as client
/// certificate, and the peer's certificate verified against `roots` for the server name *and*
/// required to carry the replica mark ([`REPLICA_URI`]), so that no other certificate the CA
/// issued for that name can pose as a replica and be served its peers' requests.
pub fn replica_client_config(
    identity: Identity,
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<ClientConfig, ConfigError> {
    let provider = provider();
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ReplicaVerifier { inner }))
        .with_client_auth_cert(identity.chain, identity.key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The web PKI's verdict, and then the replica mark.
#[derive(Debug)]
struct ReplicaVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for ReplicaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match is_replica_certificate(end_entity) {
            Ok(true) => Ok(verified),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The validity window of a certificate, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before this instant.
    pub not_before: i64,
    /// Not valid after this instant.
    pub not_after: i64,
}

impl Validity {
    /// Reads the window of `der`.
    pub fn of(der: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Unparseable)?;
        Ok(Self {
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Whether `now` (seconds since the Unix epoch) lies inside the window.
    pub fn contains(&self, now: i64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// The URI SAN that marks a replica's certificate: `tunnel-server pki init` writes it, with
/// both server and client authentication, into the server certificate, so that a replica's
/// serving certificate is also its identity towards the other replicas. A certificate that
/// carries it is never an agent's ([`AgentIdentity::from_certificate`] refuses it), and only
/// such a certificate is a replica's.
pub const REPLICA_URI: &str = "urn:edge-tunnel:replica";

/// Whether `der`, a verified certificate, carries the replica mark ([`REPLICA_URI`]).
pub fn is_replica_certificate(der: &CertificateDer<'_>) -> Result<bool, IdentityError> {
    use x509_parser::extensions::GeneralName;
    with_alt_names(der, |names| {
        names
            .iter()
            .any(|name| matches!(name, GeneralName::URI(uri) if *uri == REPLICA_URI))
    })
}

/// The DNS names among `der`'s subject alternative names, in order: a replica verifies its
/// peers by the first of its own (they serve the same certificate).
pub fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, IdentityError> {
    use x509_parser::extensions::GeneralName;
    with_alt_names(der, |names| {
        names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect()
    })
}

/// `read` applied to the subject alternative names of `der` (none when it has no such
/// extension, or one that does not parse).
fn with_alt_names<T>(
    der: &CertificateDer<'_>,
    read: impl FnOnce(&[x509_parser::extensions::GeneralName<'_>]) -> T,
) -> Result<T, IdentityError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Unparseable)?;
    let san = cert.subject_alternative_name().ok().flatten();
    Ok(read(san.map_or(&[][..], |san| &san.value.general_names)))
}

/// Who an agent is, taken from its verified certificate: nothing else decides it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentIdentity {
    /// The node name: the first DNS SAN, else the subject CN (`system:node:NAME` with
    /// `O=system:nodes` gives NAME); lowercased. A SAN and a CN that differ are refused.
    pub node_name: String,
    /// The node's IPs: the certificate's IP SANs.
    pub node_ips: Vec<IpAddr>,
}

/// Why a certificate does not name a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The peer sent no certificate.
    #[error("no client certificate")]
    Missing,
    /// The certificate is not parseable X.509.
    #[error("unparseable certificate")]
    Unparseable,
    /// Neither a DNS SAN nor a CN.
    #[error("certificate names no node (no DNS SAN, no CN)")]
    NoName,
    /// The name is not a valid node name.
    #[error("certificate names an invalid node {0:?}")]
    InvalidName(String),
    /// The DNS SAN and the CN name different nodes.
    #[error("certificate names two nodes: DNS SAN {san:?} and CN {cn:?}")]
    Mismatch {
        /// The first DNS SAN.
        san: String,
        /// The CN.
        cn: String,
    },
    /// A `system:node:` CN without the `system:nodes` organisation.
    #[error("CN system:node:… without O=system:nodes is not a node certificate")]
    NotANodeCertificate,
    /// A replica's certificate ([`REPLICA_URI`]): it never names a node.
    #[error("a replica's certificate (URI SAN {REPLICA_URI}) cannot serve as a node's")]
    ReplicaCertificate,
}

impl AgentIdentity {
    /// Reads the identity from a leaf certificate that the TLS layer has already verified.
    pub fn from_certificate(der: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Unparseable)?;
        let mut dns = None;
        let mut node_ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) if *uri == REPLICA_URI => {
                        return Err(IdentityError::ReplicaCertificate);
                    }
                    GeneralName::DNSName(d) if dns.is_none() => dns = Some((*d).to_owned()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                            node_ips.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                            node_ips.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok());
        // Kubernetes node client certificates say `system:node:NAME`, and only count as such
        // with the `system:nodes` organisation (as the apiserver's node authorizer requires).
        let cn = match cn.map(|cn| (cn, cn.strip_prefix("system:node:"))) {
            Some((_, Some(node))) => {
                let in_nodes_group = cert
                    .subject()
                    .iter_organization()
                    .any(|o| o.as_str() == Ok("system:nodes"));
                if !in_nodes_group {
                    return Err(IdentityError::NotANodeCertificate);
                }
                Some(node)
            }
            Some((cn, None)) => Some(cn),
            None => None,
        };
        let name = match (dns, cn) {
            (Some(dns), Some(cn)) if !dns.eq_ignore_ascii_case(cn) => {
                // Two different names: refuse rather than guess which one the issuer meant.
                return Err(IdentityError::Mismatch {
                    san: dns.chars().take(64).collect(),
                    cn: cn.chars().take(64).collect(),
                });
            }
            (Some(dns), _) => dns,
            (None, Some(cn)) => cn.to_owned(),
            (None, None) => return Err(IdentityError::NoName),
        };
        match parse_host(&name) {
            Ok(NodeRef::Name(node_name)) => Ok(Self {
                node_name,
                node_ips,
            }),
            _ => Err(IdentityError::InvalidName(name.chars().take(64).collect())),
        }
    }

    /// From the peer certificates a rustls or quinn connection reports (leaf first).
    pub fn from_chain(chain: Option<&[CertificateDer<'_>]>) -> Result<Self, IdentityError> {
        let leaf = chain
            .and_then(|c| c.first())
            .ok_or(IdentityError::Missing)?;
        Self::from_certificate(leaf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_accepts_as_its_peer_only_a_certificate_with_the_replica_mark() {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
            SanType,
        };
        use rustls::client::danger::ServerCertVerifier;
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |marked: bool| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec!["replicas.test".into()]).unwrap();
            if marked {
                params
                    .subject_alt_names
                    .push(SanType::URI(REPLICA_URI.try_into().unwrap()));
            }
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.signed_by(&key, &issuer).unwrap().der().clone()
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let verifier = ReplicaVerifier { inner };
        let name = rustls_pki_types::ServerName::try_from("replicas.test").unwrap();
        let now = rustls_pki_types::UnixTime::now();
        assert!(
            verifier
                .verify_server_cert(&leaf(true), &[], &name, &[], now)
                .is_ok()
        );
        // The same CA and name without the mark: an agent's or anyone's, not a replica.
        assert_eq!(
            verifier
                .verify_server_cert(&leaf(false), &[], &name, &[], now)
                .unwrap_err(),
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure
            )
        );
    }

    fn cert(params: rcgen::CertificateParams) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn identity_prefers_dns_san_and_collects_ips() {
        let mut p = rcgen::CertificateParams::new(vec!["Node-A".into(), "other".into()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "node-a");
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress("10.0.0.5".parse().unwrap()));
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress("fd00::5".parse().unwrap()));
        let id = AgentIdentity::from_certificate(&cert(p)).unwrap();
        assert_eq!(id.node_name, "node-a");
        assert_eq!(
            id.node_ips,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn identity_falls_back_to_cn_and_rejects_bad_names() {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "edge-7");
        assert_eq!(
            AgentIdentity::from_certificate(&cert(p)).unwrap().node_name,
            "edge-7"
        );

        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:edge-8");
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "system:nodes");
        assert_eq!(
            AgentIdentity::from_certificate(&cert(p)).unwrap().node_name,
            "edge-8"
        );

        // A user certificate that borrows the node prefix is not a node.
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "system:node:edge-8");
        assert_eq!(
            AgentIdentity::from_certificate(&cert(p)),
            Err(IdentityError::NotANodeCertificate)
        );

        // A SAN and a CN that name different nodes.
        let mut p = rcgen::CertificateParams::new(vec!["node-b".into()]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "node-a");
        assert!(matches!(
            AgentIdentity::from_certificate(&cert(p)),
            Err(IdentityError::Mismatch { .. })
        ));

        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "edge 7");
        assert!(matches!(
            AgentIdentity::from_certificate(&cert(p)),
            Err(IdentityError::InvalidName(_))
        ));

        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        assert_eq!(
            AgentIdentity::from_certificate(&cert(p)),
            Err(IdentityError::NoName)
        );
        assert_eq!(AgentIdentity::from_chain(None), Err(IdentityError::Missing));
    }
}
