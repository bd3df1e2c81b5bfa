//! What the tests that run the `tunnel-server` binary share.

/// Fronts and meta server on ports the kernel picks, so that tests never collide.
pub(crate) const EPHEMERAL_FRONTS: [&str; 6] = [
    "--secure-port",
    "0",
    "--insecure-port",
    "0",
    "--meta-port",
    "0",
];

/// The binary with its TLS files from `pki`, bound to 127.0.0.1, QUIC only, tunnel on `port`
/// and every other port picked by the kernel.
// The CLI tests include this module too, and start no server.
#[allow(dead_code)]
pub(crate) fn server_command(
    pki: &tunnel_server::pki::PkiFiles,
    port: u16,
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnel-server"));
    cmd.arg("--tls-cert-file")
        .arg(&pki.server_cert)
        .arg("--tls-private-key-file")
        .arg(&pki.server_key)
        .arg("--client-ca-file")
        .arg(&pki.ca_cert)
        .args(["--bind-address", "127.0.0.1", "--transports", "quic"])
        .args(["--tunnel-port", &port.to_string()])
        .args(EPHEMERAL_FRONTS)
        .kill_on_drop(true);
    cmd
}
