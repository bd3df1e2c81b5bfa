use anyhow::Context;
use clap::Parser;
use tunnel_agent::cli::Cli;
use tunnel_process::{signal, telemetry};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log.log_format)?;
    let mut config = cli.into_config();
    config.validate().context("invalid configuration")?;
    config.metrics = Some(telemetry::install_recorder()?);
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        tunnel_agent::run(config, signal::shutdown_signal())
            .await
            .context("tunnel agent")
    })
}
