use anyhow::Context;
use clap::Parser;
use tunnel_server::cli::{Cli, Command, PkiAction};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    if let Some(Command::Pki {
        action: PkiAction::Init(args),
    }) = cli.command
    {
        let out = args.out.clone();
        let files = tunnel_server::pki::init(&args.into_request())
            .with_context(|| format!("writing PKI to {}", out.display()))?;
        println!("wrote {}", files.ca_cert.display());
        println!(
            "wrote {} / {}",
            files.server_cert.display(),
            files.server_key.display()
        );
        for (node, crt, key) in &files.agents {
            println!("wrote {node}: {} / {}", crt.display(), key.display());
        }
        return Ok(());
    }
    let mut config = cli.serve.into_config();
    config.validate().context("invalid configuration")?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    config.metrics = Some(handle);
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        tunnel_server::run(config, tunnel_core::meta::shutdown_signal())
            .await
            .context("tunnel server")
    })
}
