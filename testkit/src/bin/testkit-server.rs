//! The `tunnel-server` program, built in this package so that its tests can run real replica
//! processes (and kill them: a crash closes nothing gracefully).

fn main() -> anyhow::Result<()> {
    tunnel_server::cli::main()
}
