//! `tunnel-server pki init`: a CA, a server certificate and agent certificates, for development,
//! tests and the quickstart. Production clusters issue agent certificates through their own CA.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// One agent certificate to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    /// The node name (DNS SAN and CN).
    pub node: String,
    /// The node's IPs (IP SANs).
    pub ips: Vec<IpAddr>,
}

impl std::str::FromStr for AgentSpec {
    type Err = PkiError;

    /// `NODE` or `NODE=IP,IP…`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (node, ips) = s.split_once('=').unwrap_or((s, ""));
        let Ok(tunnel_core::NodeRef::Name(node)) = tunnel_core::route::parse_host(node.trim())
        else {
            return Err(PkiError::Spec(format!("{node:?} is not a node name")));
        };
        let ips = ips
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map(|i| {
                i.parse().map_err(|_| {
                    PkiError::Spec(format!("{i:?} is not an IP address (agent {node})"))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { node, ips })
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct PkiRequest {
    /// Output directory (created).
    pub out: PathBuf,
    /// DNS names and IPs of the server certificate.
    pub server_sans: Vec<String>,
    /// Agent certificates.
    pub agents: Vec<AgentSpec>,
    /// Validity of every certificate, in days.
    pub validity_days: u32,
}

/// Why the PKI could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A bad `--agent` value.
    #[error("invalid agent: {0}")]
    Spec(String),
    /// rcgen refused.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
}

/// Paths of what [`init`] wrote.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// `ca.crt`.
    pub ca_cert: PathBuf,
    /// `ca.key`.
    pub ca_key: PathBuf,
    /// `server.crt`.
    pub server_cert: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    /// `agents/NODE.crt` and `agents/NODE.key`, in request order.
    pub agents: Vec<(String, PathBuf, PathBuf)>,
}

fn validity(params: &mut CertificateParams, days: u32) {
    // An hour of slack for clocks that lag the issuer's.
    let start = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    params.not_before = start.into();
    params.not_after = (std::time::SystemTime::now()
        + std::time::Duration::from_secs(u64::from(days) * 86_400))
    .into();
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)
}

/// Writes `ca.crt ca.key server.crt server.key agents/NODE.crt agents/NODE.key` under
/// `req.out`. Blocking file IO: call it before starting async work, or from `spawn_blocking`.
pub fn init(req: &PkiRequest) -> Result<PkiFiles, PkiError> {
    let mkdir = |p: &Path| {
        fs::create_dir_all(p).map_err(|source| PkiError::Write {
            path: p.to_owned(),
            source,
        })
    };
    mkdir(&req.out)?;
    mkdir(&req.out.join("agents"))?;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "edge-tunnel CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, req.validity_days);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let files = PkiFiles {
        ca_cert: req.out.join("ca.crt"),
        ca_key: req.out.join("ca.key"),
        server_cert: req.out.join("server.crt"),
        server_key: req.out.join("server.key"),
        agents: req
            .agents
            .iter()
            .map(|a| {
                (
                    a.node.clone(),
                    req.out.join("agents").join(format!("{}.crt", a.node)),
                    req.out.join("agents").join(format!("{}.key", a.node)),
                )
            })
            .collect(),
    };
    write(&files.ca_cert, &ca_cert.pem(), false)?;
    write(&files.ca_key, &issuer.key().serialize_pem(), true)?;

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(Vec::<String>::new())?;
    server
        .distinguished_name
        .push(DnType::CommonName, "edge-tunnel-server");
    server.subject_alt_names = req
        .server_sans
        .iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(s.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    // A replica's serving certificate is also its identity towards the other replicas: the
    // mark, and client authentication for the links it dials to them.
    server
        .subject_alt_names
        .push(SanType::URI(tunnel_core::tls::REPLICA_URI.try_into()?));
    server.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut server, req.validity_days);
    let server_cert = server.signed_by(&server_key, &issuer)?;
    write(&files.server_cert, &server_cert.pem(), false)?;
    write(&files.server_key, &server_key.serialize_pem(), true)?;

    for (spec, (_, crt, key)) in req.agents.iter().zip(&files.agents) {
        let agent_key = KeyPair::generate()?;
        let mut agent = CertificateParams::new(vec![spec.node.clone()])?;
        agent
            .distinguished_name
            .push(DnType::CommonName, spec.node.clone());
        agent
            .subject_alt_names
            .extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        agent.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut agent, req.validity_days);
        let cert = agent.signed_by(&agent_key, &issuer)?;
        write(crt, &cert.pem(), false)?;
        write(key, &agent_key.serialize_pem(), true)?;
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_specs() {
        let a: AgentSpec = "Node-A=10.0.0.5, fd00::1".parse().unwrap();
        assert_eq!(a.node, "node-a");
        assert_eq!(a.ips.len(), 2);
        assert!("node-a=10.0.0.300".parse::<AgentSpec>().is_err());
        assert!("bad name".parse::<AgentSpec>().is_err());
    }

    #[test]
    fn init_writes_a_chain_that_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(&PkiRequest {
            out: dir.path().to_owned(),
            server_sans: vec!["localhost".into(), "127.0.0.1".into()],
            agents: vec!["node-a=10.0.0.5".parse().unwrap()],
            validity_days: 30,
        })
        .unwrap();
        let (node, crt, _) = &files.agents[0];
        let pem = fs::read(crt).unwrap();
        let chain = tunnel_core::tls::certs_from_pem(&pem, "agent").unwrap();
        let id = tunnel_core::AgentIdentity::from_certificate(&chain[0]).unwrap();
        assert_eq!(&id.node_name, node);
        assert_eq!(id.node_ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert!(!tunnel_core::tls::is_replica_certificate(&chain[0]).unwrap());
        // The server certificate is a replica's: marked, and never a node's.
        let server =
            tunnel_core::tls::certs_from_pem(&fs::read(&files.server_cert).unwrap(), "server")
                .unwrap();
        assert!(tunnel_core::tls::is_replica_certificate(&server[0]).unwrap());
        assert_eq!(
            tunnel_core::AgentIdentity::from_certificate(&server[0]),
            Err(tunnel_core::tls::IdentityError::ReplicaCertificate)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&files.ca_key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
