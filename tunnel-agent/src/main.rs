fn main() -> anyhow::Result<()> {
    tunnel_agent::cli::main()
}
