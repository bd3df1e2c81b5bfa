//! rathole with its TLS transport, as the peer column: a server and a client process on
//! loopback, one service per target. Installed by `cargo install rathole`; when it is not on
//! the PATH its column is skipped, and the report says so.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// A running rathole server and client.
pub(crate) struct Rathole {
    server: Child,
    _client: Child,
    /// Target port → the rathole server's service address for it.
    pub(crate) services: HashMap<u16, SocketAddr>,
}

impl Rathole {
    /// The server's process id (for its memory).
    pub(crate) fn server_rss(&self) -> anyhow::Result<u64> {
        crate::memory::rss_of(self.server.id().context("rathole server gone")?)
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether `rathole` runs here.
pub(crate) async fn available() -> bool {
    Command::new("rathole")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Starts rathole (TLS, the server certificate of `pki`) in front of `targets`; ready when a
/// connection through the first service (an echo target) echoes.
pub(crate) async fn start(
    dir: &FsPath,
    pki: &tunnel_server::pki::PkiFiles,
    targets: &[SocketAddr],
) -> anyhow::Result<Rathole> {
    let pfx = dir.join("rathole.pfx");
    let out = Command::new("openssl")
        .args(["pkcs12", "-export", "-passout", "pass:bench", "-out"])
        .arg(&pfx)
        .arg("-inkey")
        .arg(&pki.server_key)
        .arg("-in")
        .arg(&pki.server_cert)
        .output()
        .await
        .context("openssl (for rathole's PKCS#12 identity)")?;
    if !out.status.success() {
        bail!("openssl pkcs12: {}", String::from_utf8_lossy(&out.stderr));
    }
    let control = free_port()?;
    let mut server_toml = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.transport]\ntype = \"tls\"\n\
         [server.transport.tls]\npkcs12 = {:?}\npkcs12_password = \"bench\"\n",
        pfx.display().to_string()
    );
    let mut client_toml = format!(
        "[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.transport]\ntype = \"tls\"\n\
         [client.transport.tls]\ntrusted_root = {:?}\nhostname = \"localhost\"\n",
        pki.ca_cert.display().to_string()
    );
    let mut services = HashMap::new();
    for (i, target) in targets.iter().enumerate() {
        let port = free_port()?;
        server_toml.push_str(&format!(
            "[server.services.s{i}]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{port}\"\n"
        ));
        client_toml.push_str(&format!(
            "[client.services.s{i}]\ntoken = \"bench\"\nlocal_addr = \"{target}\"\n"
        ));
        services.insert(target.port(), SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let (server_cfg, client_cfg) = (
        dir.join("rathole-server.toml"),
        dir.join("rathole-client.toml"),
    );
    tokio::fs::write(&server_cfg, server_toml).await?;
    tokio::fs::write(&client_cfg, client_toml).await?;
    let spawn = |cfg: &FsPath| {
        Command::new("rathole")
            .arg(cfg)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawn rathole")
    };
    let server = spawn(&server_cfg)?;
    let client = spawn(&client_cfg)?;
    let rathole = Rathole {
        server,
        _client: client,
        services,
    };
    let first = crate::paths::Path::Rathole {
        services: rathole.services.clone(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if crate::measure::round_trip_once(&first, targets[0], 64)
            .await
            .is_ok()
        {
            return Ok(rathole);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("rathole did not come up within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
