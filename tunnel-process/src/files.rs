//! The TLS material of a tunnel process: certificate chain, private key and CA bundle (PEM),
//! each read once with `tokio::fs`, so that loading never blocks a runtime thread.
//!
//! Errors name the flag and the path at fault. The bytes stay available after parsing, so a
//! caller that derives more from one file (the server's QUIC reset secret from its key) does
//! not read it again.

use std::fmt;
use std::path::Path;

use crate::ConfigError;

/// The flag of the certificate chain, the same on both binaries.
pub const CERT_FLAG: &str = "--tls-cert-file";
/// The flag of the private key, the same on both binaries.
pub const KEY_FLAG: &str = "--tls-private-key-file";
/// How errors about the certificate and key as a pair name them.
const PAIR_FLAGS: &str = "--tls-cert-file/--tls-private-key-file";

/// Where the TLS files are, as the flags gave them.
#[derive(Debug, Clone, Copy)]
pub struct TlsPaths<'a> {
    /// Certificate chain (PEM), leaf first: [`CERT_FLAG`].
    pub cert: Option<&'a Path>,
    /// Its private key (PEM): [`KEY_FLAG`].
    pub key: Option<&'a Path>,
    /// The CA bundle (PEM) the peer's certificate must chain to.
    pub ca: Option<&'a Path>,
    /// The flag naming the CA bundle (`--client-ca-file` on the server, `--ca-file` on the
    /// agent).
    pub ca_flag: &'static str,
}

/// Reads the file `flag` names. An IO error becomes [`ConfigError::Read`] with flag and path.
pub async fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| ConfigError::Read {
            flag,
            path: path.to_owned(),
            source,
        })
}

async fn read_required(flag: &'static str, path: Option<&Path>) -> Result<Vec<u8>, ConfigError> {
    match path {
        Some(path) => read(flag, path).await,
        None => Err(ConfigError::Missing { flag }),
    }
}

/// The three TLS files, read. `Debug` leaves the key out.
pub struct TlsFiles {
    /// The certificate chain (PEM).
    pub cert: Vec<u8>,
    /// The private key (PEM). Secret: never log it.
    pub key: Vec<u8>,
    /// The CA bundle (PEM).
    pub ca: Vec<u8>,
    ca_flag: &'static str,
}

impl fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsFiles")
            .field("cert", &format_args!("{} bytes", self.cert.len()))
            .field("key", &format_args!("<redacted>"))
            .field("ca", &format_args!("{} bytes", self.ca.len()))
            .field("ca_flag", &self.ca_flag)
            .finish()
    }
}

impl TlsFiles {
    /// Reads certificate, key and CA bundle, in that order, each once. A path that is `None`
    /// is [`ConfigError::Missing`]; an unreadable file is [`ConfigError::Read`].
    pub async fn load(paths: TlsPaths<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            cert: read_required(CERT_FLAG, paths.cert).await?,
            key: read_required(KEY_FLAG, paths.key).await?,
            ca: read_required(paths.ca_flag, paths.ca).await?,
            ca_flag: paths.ca_flag,
        })
    }

    /// The certificate chain and key, parsed.
    pub fn identity(&self) -> Result<tunnel_core::Identity, ConfigError> {
        tunnel_core::Identity::from_pem(&self.cert, &self.key).map_err(|source| ConfigError::Tls {
            flag: PAIR_FLAGS,
            source,
        })
    }

    /// The CA bundle, parsed into trust roots.
    pub fn roots(&self) -> Result<rustls::RootCertStore, ConfigError> {
        tunnel_core::tls::roots_from_pem(&self.ca, "CA bundle").map_err(|source| ConfigError::Tls {
            flag: self.ca_flag,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths<'a>(cert: &'a Path, key: &'a Path, ca: &'a Path) -> TlsPaths<'a> {
        TlsPaths {
            cert: Some(cert),
            key: Some(key),
            ca: Some(ca),
            ca_flag: "--ca-file",
        }
    }

    #[tokio::test]
    async fn an_unreadable_file_is_named_by_flag_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("agent.crt");
        let key = dir.path().join("agent.key");
        let ca = dir.path().join("ca.crt");
        tokio::fs::write(&cert, "cert").await.unwrap();

        let err = TlsFiles::load(paths(&cert, &key, &ca)).await.unwrap_err();
        let ConfigError::Read { flag, path, source } = &err else {
            panic!("expected a read error, got {err:?}");
        };
        assert_eq!(*flag, KEY_FLAG);
        assert_eq!(path, &key);
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot read --tls-private-key-file {}",
                key.display()
            )),
            "{text}"
        );

        tokio::fs::write(&key, "key").await.unwrap();
        let err = TlsFiles::load(paths(&cert, &key, &ca)).await.unwrap_err();
        assert!(
            matches!(&err, ConfigError::Read { flag: "--ca-file", path, .. } if path == &ca),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_path_is_named_by_its_flag() {
        let err = TlsFiles::load(TlsPaths {
            cert: None,
            key: None,
            ca: None,
            ca_flag: "--client-ca-file",
        })
        .await
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::Missing { flag: CERT_FLAG }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn bytes_are_kept_and_bad_pem_names_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca) = (
            dir.path().join("c"),
            dir.path().join("k"),
            dir.path().join("a"),
        );
        tokio::fs::write(&cert, "not pem").await.unwrap();
        tokio::fs::write(&key, "secret key bytes").await.unwrap();
        tokio::fs::write(&ca, "not pem either").await.unwrap();
        let files = TlsFiles::load(paths(&cert, &key, &ca)).await.unwrap();
        assert_eq!(files.key, b"secret key bytes");
        assert!(!format!("{files:?}").contains("secret"));
        assert!(matches!(
            files.identity(),
            Err(ConfigError::Tls {
                flag: PAIR_FLAGS,
                ..
            })
        ));
        assert!(matches!(
            files.roots(),
            Err(ConfigError::Tls {
                flag: "--ca-file",
                ..
            })
        ));
    }
}
