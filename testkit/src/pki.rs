//! Certificates for tests: the tunnel's PKI (CA, server, agents) from `tunnel-server pki init`,
//! and a separate kubelet PKI (serving certificate for the node names, apiserver client
//! certificate), as a real cluster has.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tunnel_server::pki::{AgentSpec, PkiFiles, PkiRequest, init};

/// The apiserver's client identity toward kubelets.
pub const APISERVER_CLIENT: &str = "kube-apiserver-kubelet-client";

/// Both PKIs in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    /// The tunnel's CA, server and agent certificates.
    pub tunnel: PkiFiles,
    /// The kubelet side: `server.crt` serves every node name; the one "agent" is the apiserver
    /// client certificate.
    pub kubelet: PkiFiles,
}

impl TestPki {
    /// Certificates for `nodes` (name, IPs).
    pub fn new(nodes: &[(&str, &[IpAddr])]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tunnel = init(&PkiRequest {
            out: dir.path().join("tunnel"),
            server_sans: vec!["localhost".into(), "127.0.0.1".into()],
            agents: nodes
                .iter()
                .map(|(n, ips)| AgentSpec {
                    node: (*n).to_owned(),
                    ips: ips.to_vec(),
                })
                .collect(),
            validity_days: 30,
        })
        .expect("tunnel pki");
        let kubelet = init(&PkiRequest {
            out: dir.path().join("kubelet"),
            server_sans: nodes.iter().map(|(n, _)| (*n).to_owned()).collect(),
            agents: vec![AgentSpec {
                node: APISERVER_CLIENT.into(),
                ips: vec![],
            }],
            validity_days: 30,
        })
        .expect("kubelet pki");
        Self {
            dir,
            tunnel,
            kubelet,
        }
    }

    /// Another, unrelated PKI (for "wrong CA" tests) with the same node names.
    pub fn foreign(&self, nodes: &[&str]) -> PkiFiles {
        init(&PkiRequest {
            out: self.dir.path().join("foreign"),
            server_sans: vec!["localhost".into()],
            agents: nodes
                .iter()
                .map(|n| AgentSpec {
                    node: (*n).to_owned(),
                    ips: vec![],
                })
                .collect(),
            validity_days: 30,
        })
        .expect("foreign pki")
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Cert and key paths of a tunnel agent.
    pub fn agent(&self, node: &str) -> (PathBuf, PathBuf) {
        agent_files(&self.tunnel, node)
    }

    /// Cert and key of the apiserver's kubelet client.
    pub fn apiserver_client(&self) -> (PathBuf, PathBuf) {
        agent_files(&self.kubelet, APISERVER_CLIENT)
    }

    /// curl's flags to talk to a kubelet as kube-apiserver does: its client certificate, and
    /// the kubelet CA to verify the kubelet.
    pub fn curl_apiserver_args(&self) -> Vec<std::ffi::OsString> {
        let (crt, key) = self.apiserver_client();
        vec![
            "--cacert".into(),
            self.kubelet.ca_cert.clone().into(),
            "--cert".into(),
            crt.into(),
            "--key".into(),
            key.into(),
        ]
    }

    /// A rustls client config as kube-apiserver would use toward kubelets.
    pub fn apiserver_tls(&self) -> Arc<rustls::ClientConfig> {
        let (crt, key) = self.apiserver_client();
        let id = tunnel_core::Identity::from_pem(&read(&crt), &read(&key)).expect("client id");
        let roots =
            tunnel_core::tls::roots_from_pem(&read(&self.kubelet.ca_cert), "ca").expect("roots");
        Arc::new(
            rustls::ClientConfig::builder_with_provider(tunnel_core::tls::provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(id.chain, id.key)
                .expect("client cert"),
        )
    }

    /// The kubelet's serving config: client certificates required, from the kubelet CA.
    pub fn kubelet_tls(&self) -> Arc<rustls::ServerConfig> {
        let id = tunnel_core::Identity::from_pem(
            &read(&self.kubelet.server_cert),
            &read(&self.kubelet.server_key),
        )
        .expect("kubelet id");
        let roots =
            tunnel_core::tls::roots_from_pem(&read(&self.kubelet.ca_cert), "ca").expect("roots");
        let provider = tunnel_core::tls::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain, id.key)
            .expect("kubelet cert");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

fn agent_files(files: &PkiFiles, node: &str) -> (PathBuf, PathBuf) {
    files
        .agents
        .iter()
        .find(|(n, _, _)| n == node)
        .map(|(_, c, k)| (c.clone(), k.clone()))
        .unwrap_or_else(|| panic!("no certificate for {node}"))
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

impl TestPki {
    /// Writes a kubeconfig with which `kubectl get --raw` talks to a kubelet the way the
    /// apiserver does: to `server` (an https URL, here the TLS front), verifying the kubelet's
    /// certificate for `node` (sent as SNI), with the apiserver's client certificate.
    pub fn write_kubeconfig(&self, path: &Path, server: &str, node: &str) -> std::io::Result<()> {
        self.write_kubeconfig_with(path, server, &format!("tls-server-name: {node}"))
    }

    /// A kubeconfig that reaches `server` (`https://NODE:PORT`) through the HTTP front used as
    /// kubectl's `proxy-url` (CONNECT).
    pub fn write_proxy_kubeconfig(
        &self,
        path: &Path,
        server: &str,
        proxy: &str,
    ) -> std::io::Result<()> {
        self.write_kubeconfig_with(path, server, &format!("proxy-url: {proxy}"))
    }

    fn write_kubeconfig_with(&self, path: &Path, server: &str, extra: &str) -> std::io::Result<()> {
        let (crt, key) = self.apiserver_client();
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: tunnel\n  cluster:\n    server: {server}\n    {extra}\n    certificate-authority: {ca}\nusers:\n- name: apiserver\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: tunnel\n  context:\n    cluster: tunnel\n    user: apiserver\ncurrent-context: tunnel\n",
            ca = self.kubelet.ca_cert.display(),
            crt = crt.display(),
            key = key.display(),
        );
        std::fs::write(path, yaml)
    }
}
