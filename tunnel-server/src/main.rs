use anyhow::Context;
use clap::Parser;
use tunnel_process::{signal, telemetry};
use tunnel_server::cli::{Cli, Command, PkiAction};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log.log_format)?;
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
    let mut config = cli
        .serve
        .into_config()
        .map_err(anyhow::Error::msg)
        .context("invalid configuration")?;
    config.validate().context("invalid configuration")?;
    config.metrics = Some(telemetry::install_recorder()?);
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        tunnel_server::run(config, signal::shutdown_signal())
            .await
            .context("tunnel server")
    })
}
