//! The binary's command line: refuses to start without TLS or with a bad configuration, and
//! writes a PKI.

mod common;

use std::process::Command;

fn server() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunnel-server"))
}

#[test]
fn refuses_to_start_without_the_three_tls_files() {
    let out = server()
        .args(["--tunnel-port", "0"])
        .args(common::EPHEMERAL_FRONTS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tls-cert-file is required"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("missing.crt");
    let out = server()
        .args([
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-private-key-file",
            "x.key",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--client-ca-file is required"), "{stderr}");
}

#[test]
fn unreadable_tls_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = server()
        .current_dir(dir.path())
        .args([
            "--tls-cert-file",
            "nope.crt",
            "--tls-private-key-file",
            "nope.key",
            "--client-ca-file",
            "ca.crt",
            "--tunnel-port",
            "0",
        ])
        .args(common::EPHEMERAL_FRONTS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read --tls-cert-file nope.crt"),
        "{stderr}"
    );
}

#[test]
fn pki_init_writes_the_layout_the_docs_promise() {
    let dir = tempfile::tempdir().unwrap();
    let out = server()
        .args(["pki", "init", "--out"])
        .arg(dir.path())
        .args([
            "--server-san",
            "localhost,127.0.0.1",
            "--agent",
            "node-a=10.0.0.5",
            "--agent",
            "node-b",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "agents/node-a.crt",
        "agents/node-a.key",
        "agents/node-b.crt",
        "agents/node-b.key",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
}

/// Starts the binary with `args` and requires that it refuses to, saying `why`.
async fn refuses(pki: &tunnel_server::pki::PkiFiles, args: &[&std::ffi::OsStr], why: &str) {
    let out = common::server_command(pki, 0)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "started with {args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(why), "{args:?}: {stderr}");
}

#[tokio::test]
async fn a_bad_config_dir_or_an_unsafe_egress_port_stops_the_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pki = tunnel_server::pki::init(&tunnel_server::pki::PkiRequest {
        out: dir.path().join("pki"),
        server_sans: vec!["localhost".into()],
        agents: vec![],
        validity_days: 1,
    })
    .unwrap();
    let config = dir.path().join("edge-tunnel-server-cfg");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("https-proxy-ports"), "9052, 9052").unwrap();
    let flag = |f: &'static str| std::ffi::OsStr::new(f);
    refuses(
        &pki,
        &[flag("--config-dir"), config.as_os_str()],
        "https-proxy-ports: port 9052 is listed twice",
    )
    .await;
    let missing = dir.path().join("missing");
    refuses(
        &pki,
        &[flag("--config-dir"), missing.as_os_str()],
        "cannot read --config-dir",
    )
    .await;
    refuses(
        &pki,
        &[flag("--connect-port"), flag("0")],
        "--connect-client-ca-file is required",
    )
    .await;
    // The agents' CA for the egress port: any agent could reach every node through it.
    refuses(
        &pki,
        &[
            flag("--connect-port"),
            flag("0"),
            flag("--connect-client-ca-file"),
            pki.ca_cert.as_os_str(),
        ],
        "--connect-client-ca-file: it holds a CA of --client-ca-file",
    )
    .await;
}
