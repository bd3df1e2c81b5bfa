//! The `tunnel-agent` program, built in this package so that its tests can run a real agent
//! process (and kill it: a crash sends nothing to the server).

fn main() -> anyhow::Result<()> {
    tunnel_agent::cli::main()
}
