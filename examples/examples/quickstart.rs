//! The whole tunnel on loopback, no cluster needed: a tunnel server on its default ports
//! (10262-10265 on 127.0.0.1), an agent for node `demo-node`, and a demo kubelet behind it.
//! Prints the curl and kubectl commands that go through the tunnel, and runs until Ctrl-C.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Context;
use demo_logs::log_lines;
use testkit::{FakeKubelet, TestPki};
use tunnel_agent::AgentConfig;
use tunnel_core::PortSet;
use tunnel_server::{Server, ServerConfig};

const NODE: &str = "demo-node";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let metrics = metrics_handle()?;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);

    // Certificates: the tunnel's (CA, server, agent) and the kubelet's (serving, apiserver
    // client), in a directory that lives as long as the demo.
    let pki =
        tokio::task::spawn_blocking(|| TestPki::new(&[(NODE, &[IpAddr::V4(Ipv4Addr::LOCALHOST)])]))
            .await
            .context("generating certificates")?;
    let kubelet = FakeKubelet::start(NODE, pki.kubelet_tls())
        .await
        .context("starting the demo kubelet")?;
    let (kubelet_port, read_only_port) = (kubelet.https_addr.port(), kubelet.http_addr.port());

    let server = Server::bind(ServerConfig {
        bind_address: loopback,
        tls_cert_file: Some(pki.tunnel.server_cert.clone()),
        tls_private_key_file: Some(pki.tunnel.server_key.clone()),
        client_ca_file: Some(pki.tunnel.ca_cert.clone()),
        server_id: "quickstart".into(),
        kubelet_port,
        kubelet_read_only_port: read_only_port,
        metrics: Some(metrics.clone()),
        drain_timeout: Duration::from_secs(2),
        // No load balancer in front to wait for.
        shutdown_delay: Duration::ZERO,
        ..ServerConfig::default()
    })
    .await
    .context("starting the tunnel server (are ports 10262-10265 free?)")?;
    let (secure, insecure, meta) = (
        server.secure_addr(),
        server.insecure_addr(),
        server.meta_addr(),
    );
    let registry = server.registry();
    let (crt, key) = pki.agent(NODE);
    let agent_config = AgentConfig {
        server_address: server.tunnel_addr().to_string(),
        server_name: Some("localhost".into()),
        node_name: NODE.into(),
        tls_cert_file: Some(crt),
        tls_private_key_file: Some(key),
        ca_file: Some(pki.tunnel.ca_cert.clone()),
        meta_port: 0,
        allowed_ports: Some(PortSet::new([kubelet_port, read_only_port])),
        localhost_proxy_ports: Some(PortSet::new([kubelet_port, read_only_port])),
        metrics: Some(metrics),
        ..AgentConfig::default()
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await.map(|_| ());
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        server
            .run(stopped(stop_rx.clone()))
            .await
            .map_err(anyhow::Error::from)
    });
    let agent_stop = stop_tx.subscribe();
    tasks.spawn(async move {
        tunnel_agent::run(agent_config, stopped(agent_stop))
            .await
            .map_err(anyhow::Error::from)
    });
    let mut logs = tokio::task::JoinSet::new();
    logs.spawn(log_lines(kubelet));
    tokio::time::timeout(Duration::from_secs(30), registry.wait_for(NODE))
        .await
        .context("the agent did not register within 30 s")?;

    let kubeconfig = pki.dir().join("kubeconfig");
    pki.write_kubeconfig(&kubeconfig, &format!("https://{secure}"), NODE)?;
    let (client_crt, client_key) = pki.apiserver_client();
    let ca = pki.kubelet.ca_cert.display();
    println!(
        "\nedge-tunnel quickstart: agent for {NODE} connected; its kubelet is reachable only through the tunnel.\n\n\
         TLS front (as kube-apiserver reaches kubelet 10250; SNI names the node):\n  \
         curl --cacert {ca} --cert {crt} --key {key} \\\n    --connect-to {NODE}:10250:{secure} https://{NODE}:10250/metrics\n  \
         kubectl --kubeconfig {kc} get --raw /pods\n  \
         kubectl --kubeconfig {kc} get --raw '/containerLogs/default/demo/app?follow=true'\n\n\
         HTTP front (as Prometheus or metrics-server reach 10255; Host names the node):\n  \
         curl -H 'Host: {NODE}' http://{insecure}/metrics\n  \
         curl -x http://{insecure} http://{NODE}:{read_only_port}/pods\n\n\
         Server metrics: curl http://{meta}/metrics\n\nCtrl-C stops.\n",
        crt = client_crt.display(),
        key = client_key.display(),
        kc = kubeconfig.display(),
        meta = meta.map_or_else(|| "-".to_owned(), |m| m.to_string()),
    );

    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        Some(r) = tasks.join_next() => r.context("a component panicked")??,
    }
    let _ = stop_tx.send(true);
    logs.shutdown().await;
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            eprintln!("{e:#}");
        }
    }
    drop(pki);
    Ok(())
}

fn metrics_handle() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")
}

mod demo_logs {
    use std::time::Duration;

    use testkit::FakeKubelet;

    /// Writes a log line per second to every followed log, like a chatty container.
    pub(crate) async fn log_lines(kubelet: FakeKubelet) -> anyhow::Result<()> {
        let mut writers = tokio::task::JoinSet::new();
        while let Some(feed) = kubelet.next_log_feed().await {
            writers.spawn(async move {
                for i in 0u64.. {
                    let line = format!("{} demo line {i}\n", feed.path);
                    if feed.lines.send(line.into()).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
            while writers.try_join_next().is_some() {}
        }
        Ok(())
    }
}
