use anyhow::Context;
use clap::Parser;
use tunnel_agent::cli::Cli;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut config = Cli::parse().into_config();
    config.validate().context("invalid configuration")?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    config.metrics = Some(handle);
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        tunnel_agent::run(config, tunnel_core::meta::shutdown_signal())
            .await
            .context("tunnel agent")
    })
}
