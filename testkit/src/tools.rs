//! The real programs the end-to-end tests run beside the tunnel (dnsmasq, haproxy, nginx,
//! dig), found where Debian puts them; `scripts/test --install-only` installs them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// Where `name` is: on `PATH`, else in the sbin directories a non-root `PATH` leaves out.
pub fn program(name: &str) -> PathBuf {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{name} not found; `scripts/test --install-only` installs it"))
}

/// A loopback port free for both UDP and TCP at the time of asking (a DNS server's, a
/// tunnel port's: the QUIC endpoints of parallel tests hold ephemeral UDP ports that a TCP
/// check alone would not see).
pub fn free_udp_tcp_port() -> u16 {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for UDP and TCP");
}

/// A dnsmasq on 127.0.0.1 with `args`, answering from its own records only (no resolv.conf,
/// no /etc/hosts), in the foreground; returned once it answers. Killed on drop.
pub async fn dnsmasq(args: &[String]) -> (Child, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_tcp_port()));
    let child = Command::new(program("dnsmasq"))
        .args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--except-interface=nonexistent",
            "--pid-file",
            "--user=root",
            "--log-facility=-",
        ])
        .arg(format!("--port={}", addr.port()))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("dnsmasq runs");
    // Ready once it answers: dig exits 0 on any answer (REFUSED for an unknown name too).
    for _ in 0..200 {
        let answered = Command::new(program("dig"))
            .arg(format!("@{}", addr.ip()))
            .args(["-p", &addr.port().to_string()])
            .args(["+tries=1", "+time=1", "+short", "ready.invalid", "A"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if answered {
            return (child, addr);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("dnsmasq never answered on {addr}");
}
